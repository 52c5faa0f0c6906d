//! `ringbench`: an fio-like load tool for nvmed, measuring the same workload through io_uring.

mod engine;
mod workload;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use engine::{Done, Engine, EngineError, NvmedEngine, UringEngine};
use hdrhistogram::Histogram;
use nvmed_client::{IoThreadInfo, NvmeSession, SessionOptions};
use serde::Serialize;
use workload::{check_block, fill_block, Rw, Workload};

mod cli;
use cli::{Args, EngineKind, OutputFormat};

#[derive(Debug, Serialize)]
struct Latency {
    mean_ns: f64,
    min_ns: u64,
    max_ns: u64,
    p50_ns: u64,
    p90_ns: u64,
    p99_ns: u64,
    p99_9_ns: u64,
    p99_99_ns: u64,
}

#[derive(Debug, Serialize)]
struct JobReport {
    job: u32,
    ios: u64,
    reads: u64,
    writes: u64,
    /// Reads whose data was checked (blocks written earlier in this run).
    verified_reads: u64,
    seconds: f64,
    iops: f64,
    mib_per_s: f64,
    latency: Latency,
}

#[derive(Debug, Serialize)]
struct Cpu {
    user_s: f64,
    sys_s: f64,
}

/// What a job process (--processes) hands back to its parent.
#[derive(Debug, Serialize, serde::Deserialize)]
struct ChildReport {
    reads: u64,
    writes: u64,
    verified: u64,
    seconds: f64,
    histogram_hex: String,
    reconnects: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    /// Times the jobs' sessions connected again to a restarted broker (the most of any job).
    reconnects: u64,
    engine: EngineKind,
    rw: Rw,
    bs: u64,
    iodepth: u32,
    /// Re-queued requests submitted every this many (--submit-batch, after the engine's choice).
    submit_batch: u64,
    /// Each reap waited for at least this many completions (--complete-min, at most the depth).
    complete_min: u64,
    numjobs: u32,
    verify: bool,
    jobs: Vec<JobReport>,
    total: JobReport,
    ringbench_cpu: Cpu,
    broker_cpu: Option<Cpu>,
    /// The broker's I/O threads after the run: rings served and device commands completed.
    broker_io_threads: Option<Vec<IoThreadInfo>>,
    /// With --embedded: what the broker recovered from, and what it still holds once the jobs
    /// left.
    broker_recovery: Option<Recovery>,
    /// Median cross-core (CPU 0 <-> CPU 1) cache-line ping-pong round trip measured right
    /// after the run (--machine-state), ns: what every shared-ring exchange pays on this
    /// machine at the time.
    pingpong_round_trip_ns: Option<f64>,
}

/// The embedded broker's recovery figures after a run.
#[derive(Debug, Serialize)]
struct Recovery {
    resets: u64,
    aborts: u64,
    retries: u64,
    /// IOVA bytes still mapped for client buffers after every job closed (0 when all were
    /// released).
    buffer_iova_bytes_after: u64,
    /// Sessions still open after every job closed (0 when all were released).
    sessions_after: u64,
}

struct JobOutcome {
    hist: Histogram<u64>,
    reads: u64,
    writes: u64,
    verified: u64,
    elapsed: Duration,
    /// Times the job's session connected again to a restarted broker.
    reconnects: u64,
}

struct JobSpec {
    id: u32,
    workload: Workload,
    iodepth: usize,
    /// Re-queued requests are submitted every this many (and after each reap's last).
    submit_batch: usize,
    /// Each reap waits for at least this many completions (or all in flight, if fewer).
    complete_min: usize,
    bs: usize,
    verify: bool,
    runtime: Duration,
    number_ios: Option<u64>,
}

struct Slots {
    started: Vec<Instant>,
    /// Per slot: (write, offset, verify this read).
    kind: Vec<(bool, u64, bool)>,
    /// Blocks of the job's range written (and completed) in this run: only those are verified
    /// on read, so data left by others on the device is not mistaken for corruption.
    written: Vec<u64>,
    /// With --verify, blocks with an I/O in flight: no second I/O is issued to such a block (as
    /// fio's serialize_overlap), since a read racing a write to the same block may legitimately
    /// return a mix of both on a device that runs requests in parallel (virtio-blk queues, ...).
    busy: Vec<u64>,
}

fn bit(map: &[u64], block: usize) -> bool {
    map.get(block / 64).is_some_and(|w| w & (1 << (block % 64)) != 0)
}

fn set_bit(map: &mut [u64], block: usize, on: bool) {
    if let Some(w) = map.get_mut(block / 64) {
        if on {
            *w |= 1 << (block % 64);
        } else {
            *w &= !(1 << (block % 64));
        }
    }
}

impl Slots {
    fn is_written(&self, block: usize) -> bool {
        bit(&self.written, block)
    }
    fn mark_written(&mut self, block: usize) {
        set_bit(&mut self.written, block, true);
    }
}

fn start_slot(
    engine: &mut dyn Engine,
    spec: &mut JobSpec,
    slots: &mut Slots,
    slot: usize,
    issued: &mut u64,
    verify: bool,
    now: Instant,
) -> Result<(), EngineError> {
    let io = loop {
        // Skips blocks with I/O in flight (verify only; run_job checks that a free one exists).
        let io = spec.workload.next_io();
        if !verify || !bit(&slots.busy, spec.workload.block_index(io.offset)) {
            break io;
        }
    };
    if verify {
        set_bit(&mut slots.busy, spec.workload.block_index(io.offset), true);
    }
    if verify && io.write {
        let block = 4096.min(spec.bs);
        let seed = *issued ^ (u64::from(spec.id) << 48);
        for (i, b) in engine.slot_mut(slot).chunks_mut(block).enumerate() {
            fill_block(b, io.offset + (i * block) as u64, seed);
        }
    }
    let check = verify && !io.write && slots.is_written(spec.workload.block_index(io.offset));
    slots.kind[slot] = (io.write, io.offset, check);
    slots.started[slot] = now;
    engine.queue(slot, io.write, io.offset)?;
    *issued += 1;
    Ok(())
}

/// Records `n` requests of latency `d` (one past the histogram's 60 s range is counted in
/// `unrecorded` instead).
fn record(hist: &mut Histogram<u64>, d: Duration, n: u64, unrecorded: &mut u64) {
    if hist.record_n(d.as_nanos().max(1) as u64, n).is_err() {
        *unrecorded += n;
    }
}

fn run_job(engine: &mut dyn Engine, mut spec: JobSpec) -> Result<JobOutcome, EngineError> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
    let mut unrecorded = 0u64;
    let verify = spec.verify && engine.moves_data();
    let bitmap_words = if verify { spec.workload.blocks().div_ceil(64) as usize } else { 0 };
    if verify && spec.workload.blocks() <= spec.iodepth as u64 {
        return Err(EngineError::Failed(format!(
            "--verify needs more blocks of --bs per job than --iodepth ({} <= {})",
            spec.workload.blocks(),
            spec.iodepth
        )));
    }
    let mut slots = Slots {
        started: vec![Instant::now(); spec.iodepth],
        kind: vec![(false, 0u64, false); spec.iodepth],
        written: vec![0; bitmap_words],
        busy: vec![0; bitmap_words],
    };
    let (mut issued, mut reads, mut writes, mut verified) = (0u64, 0u64, 0u64, 0u64);
    let block = 4096.min(spec.bs);
    let begin = Instant::now();
    let deadline = begin + spec.runtime;
    let limit = spec.number_ios;
    let more = |issued: u64| limit.map_or_else(|| Instant::now() < deadline, |n| issued < n);
    for slot in 0..spec.iodepth {
        if !more(issued) {
            break;
        }
        start_slot(engine, &mut spec, &mut slots, slot, &mut issued, verify, Instant::now())?;
    }
    engine.submit()?;
    let mut done: Vec<Done> = Vec::with_capacity(spec.iodepth);
    let mut in_flight = issued as usize;
    let mut queued = 0usize;
    while in_flight > 0 {
        done.clear();
        engine.reap(spec.complete_min.min(in_flight), &mut done)?;
        let now = Instant::now();
        let in_time = now < deadline; // one clock read per reaped batch
        let more = |issued: u64| limit.map_or(in_time, |n| issued < n);
        // Requests started together (one batch) and reaped together have one latency: one
        // histogram entry per run of them, not one per request.
        let mut run: Option<(Instant, u64)> = None;
        for &(slot, ref res) in &done {
            in_flight -= 1;
            if let Err(e) = res {
                return Err(EngineError::Failed(e.clone()));
            }
            let started = slots.started[slot];
            match run.as_mut() {
                Some((at, n)) if *at == started => *n += 1,
                _ => {
                    if let Some((at, n)) = run.replace((started, 1)) {
                        record(&mut hist, now.duration_since(at), n, &mut unrecorded);
                    }
                }
            }
            let (write, offset, check) = slots.kind[slot];
            if verify {
                set_bit(&mut slots.busy, spec.workload.block_index(offset), false);
            }
            if write {
                writes += 1;
                if verify {
                    slots.mark_written(spec.workload.block_index(offset));
                }
            } else {
                reads += 1;
                if check {
                    for (i, b) in engine.slot_mut(slot).chunks(block).enumerate() {
                        check_block(b, offset + (i * block) as u64).map_err(EngineError::Failed)?;
                    }
                    verified += 1;
                }
            }
            if more(issued) {
                // Re-issued right away: the reap time is its submission time (one clock read per batch).
                start_slot(engine, &mut spec, &mut slots, slot, &mut issued, verify, now)?;
                in_flight += 1;
                queued += 1;
                if queued == spec.submit_batch {
                    engine.submit()?;
                    queued = 0;
                }
            }
        }
        if let Some((at, n)) = run {
            record(&mut hist, now.duration_since(at), n, &mut unrecorded);
        }
        engine.submit()?;
        queued = 0;
    }
    debug_assert_eq!(hist.len() + unrecorded, reads + writes, "one latency recorded per request");
    let reconnects = engine.reconnects();
    Ok(JobOutcome { hist, reads, writes, verified, elapsed: begin.elapsed(), reconnects })
}

fn report(job: u32, o: &JobOutcome, bs: u64) -> JobReport {
    let ios = o.reads + o.writes;
    let secs = o.elapsed.as_secs_f64().max(1e-9);
    let h = &o.hist;
    JobReport {
        job,
        ios,
        reads: o.reads,
        writes: o.writes,
        verified_reads: o.verified,
        seconds: secs,
        iops: ios as f64 / secs,
        mib_per_s: (ios * bs) as f64 / secs / (1 << 20) as f64,
        latency: Latency {
            mean_ns: h.mean(),
            min_ns: h.min(),
            max_ns: h.max(),
            p50_ns: h.value_at_quantile(0.5),
            p90_ns: h.value_at_quantile(0.9),
            p99_ns: h.value_at_quantile(0.99),
            p99_9_ns: h.value_at_quantile(0.999),
            p99_99_ns: h.value_at_quantile(0.9999),
        },
    }
}

/// CPU seconds (user, sys) of this process and its waited-for children, exited threads included.
fn process_cpu() -> (f64, f64) {
    use nix::sys::resource::{getrusage, UsageWho};
    let mut total = (0.0, 0.0);
    for who in [UsageWho::RUSAGE_SELF, UsageWho::RUSAGE_CHILDREN] {
        if let Ok(u) = getrusage(who) {
            let s = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            total.0 += s(u.user_time());
            total.1 += s(u.system_time());
        }
    }
    total
}

/// CPU seconds (user, sys) of threads of `pid` whose name starts with `prefix` (all if None).
fn cpu_of(pid: i32, prefix: Option<&str>) -> (f64, f64) {
    let tick = 100.0; // USER_HZ
    let mut total = (0.0, 0.0);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return total };
    for t in tasks.flatten() {
        let p = t.path();
        if let Some(pre) = prefix {
            let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
            if !comm.starts_with(pre) {
                continue;
            }
        }
        let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
        // Fields after the ")" of the command name: state is field 3; utime 14, stime 15.
        if let Some(rest) = stat.rsplit_once(')').map(|x| x.1) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            if f.len() > 12 {
                total.0 += f[11].parse::<f64>().unwrap_or(0.0) / tick;
                total.1 += f[12].parse::<f64>().unwrap_or(0.0) / tick;
            }
        }
    }
    total
}

fn open_engine(args: &Args, socket: &Path) -> Result<Box<dyn Engine + Send>, EngineError> {
    let (depth, bs) = (args.iodepth as usize, args.bs as usize);
    Ok(match args.engine {
        EngineKind::Nvmed | EngineKind::NvmedNop => Box::new(NvmedEngine::open(
            socket,
            args.nsid,
            depth,
            bs as u32,
            args.engine == EngineKind::NvmedNop,
            args.spin_us,
        )?),
        EngineKind::IoUring => Box::new(UringEngine::open(args.filename.as_deref(), depth, bs, false)?),
        EngineKind::IoUringNop => Box::new(UringEngine::open(None, depth, bs, true)?),
        EngineKind::IoUringPassthru => {
            let path =
                args.filename.as_deref().ok_or(EngineError::Failed("needs --filename /dev/ngXnY".into()))?;
            Box::new(engine::PassthruEngine::open(path, depth, bs)?)
        }
    })
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("ringbench: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(secs) = args.pingpong {
        let (median, min, rounds) = pingpong(secs)?;
        match args.output_format {
            OutputFormat::Json => println!(
                "{}",
                serde_json::json!({"pingpong_round_trip_ns_median": median, "pingpong_round_trip_ns_min": min, "rounds": rounds})
            ),
            OutputFormat::Normal => println!(
                "ringbench: cross-core ping-pong (CPU 0 <-> CPU 1): round trip median {median:.0} ns, best {min:.0} ns ({rounds} rounds)"
            ),
        }
        return Ok(());
    }
    if args.bs == 0 || !args.bs.is_multiple_of(512) {
        return Err("--bs must be a non-zero multiple of 512".into());
    }
    let nvmed = matches!(args.engine, EngineKind::Nvmed | EngineKind::NvmedNop);
    let dir = std::env::temp_dir().join(format!("ringbench-{}", std::process::id()));
    let mut embedded = None;
    let socket = if args.embedded && nvmed {
        std::fs::create_dir_all(&dir)?;
        let sock = dir.join("nvmed.sock");
        let size = args.size.unwrap_or(1 << 30).max(args.offset + args.bs * u64::from(args.numjobs));
        let size = size.next_multiple_of(1 << 20);
        embedded = Some(start_embedded(&sock, size, &args)?);
        sock
    } else {
        args.socket.clone()
    };
    // Size of the target.
    let target = match args.engine {
        EngineKind::Nvmed => {
            let probe = NvmedEngine::open(&socket, args.nsid, 1, args.bs as u32, false, 0)?;
            probe.namespace_bytes()
        }
        EngineKind::IoUringPassthru => {
            let path =
                args.filename.as_ref().ok_or("--engine io-uring-passthru needs --filename /dev/ngXnY")?;
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let block =
                name.strip_prefix("ng").map(|r| format!("nvme{r}")).ok_or("not an /dev/ngXnY device")?;
            let sectors: u64 = std::fs::read_to_string(format!("/sys/block/{block}/size"))?.trim().parse()?;
            sectors * 512
        }
        EngineKind::IoUring => {
            let path = args.filename.as_ref().ok_or("--engine io-uring needs --filename")?;
            let want = args.size.unwrap_or(256 << 20) + args.offset;
            let meta = std::fs::metadata(path);
            if meta.as_ref().map(|m| m.is_file() && m.len() < want).unwrap_or(true) {
                let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
                f.set_len(want)?;
                // Blocks allocated now, as the embedded engine's medium is populated before the
                // run: neither side's figures then include first-touch allocation (a file system
                // that cannot preallocate keeps the file sparse).
                let _ = nix::fcntl::posix_fallocate(&f, 0, want as i64);
            }
            let f = std::fs::File::open(path)?;

            std::io::Seek::seek(&mut &f, std::io::SeekFrom::End(0))?
        }
        _ => u64::MAX / 2,
    };
    let size = args.size.unwrap_or(target.saturating_sub(args.offset));
    if args.offset + size > target {
        return Err(format!(
            "--offset + --size ({}) is past the end of the target ({target})",
            args.offset + size
        )
        .into());
    }
    let per_job = (size / u64::from(args.numjobs)) / args.bs * args.bs;
    if per_job < args.bs {
        return Err("--size is too small for --numjobs jobs of --bs".into());
    }
    if args.verify && per_job / args.bs <= u64::from(args.iodepth) {
        // Verification never puts two I/Os on one block at once: each job needs spare blocks.
        return Err(format!(
            "--verify needs more blocks per job than --iodepth: --size / --numjobs / --bs = {}",
            per_job / args.bs
        )
        .into());
    }
    let broker_pid = if nvmed && embedded.is_none() {
        NvmedEngine::open(&socket, None, 1, 4096, true, 0).ok().and_then(|e| e.broker_pid())
    } else {
        None
    };
    let self_pid = std::process::id() as i32;
    let broker_cpu0 = match (embedded.is_some(), broker_pid) {
        (true, _) => Some(cpu_of(self_pid, Some("nvmed"))),
        (false, Some(p)) => Some(cpu_of(p, None)),
        _ => None,
    };
    let self_cpu0 = process_cpu();
    if let Some(secs) = args.idle {
        if !nvmed {
            return Err("--idle measures the nvmed broker; use --engine nvmed".into());
        }
        let clients: Vec<_> =
            (0..args.numjobs).map(|_| open_engine(&args, &socket)).collect::<Result<_, _>>()?;
        let pid =
            if embedded.is_some() { self_pid } else { broker_pid.ok_or("cannot find the broker's pid")? };
        let prefix = embedded.is_some().then_some("nvmed");
        std::thread::sleep(Duration::from_millis(100)); // let the broker settle into its sleep
        let (u0, s0) = cpu_of(pid, prefix);
        std::thread::sleep(Duration::from_secs_f64(secs));
        let (u1, s1) = cpu_of(pid, prefix);
        drop(clients);
        let percent = (u1 - u0 + s1 - s0) / secs * 100.0;
        match args.output_format {
            OutputFormat::Json => println!(
                "{}",
                serde_json::json!({"idle_seconds": secs, "clients": args.numjobs, "broker_cpu_percent": percent})
            ),
            OutputFormat::Normal => {
                println!(
                    "ringbench: {} idle clients for {secs} s: broker used {percent:.2}% of a CPU",
                    args.numjobs
                )
            }
        }
        if let Some(b) = embedded.take() {
            b.shutdown()?;
        }
        return Ok(());
    }
    if let Some(j) = args.child_job {
        if let Some(l) = &args.job_cpus {
            pin_to_cpu(l.0[j as usize % l.0.len()]);
        }
        let mut engine = open_engine(&args, &socket)?;
        let o = run_job(engine.as_mut(), job_spec(&args, j, args.offset, size))?;
        let mut bytes = Vec::new();
        hdrhistogram::serialization::Serializer::serialize(
            &mut hdrhistogram::serialization::V2Serializer::new(),
            &o.hist,
            &mut bytes,
        )
        .map_err(|e| format!("{e:?}"))?;
        let histogram_hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let r = ChildReport {
            reads: o.reads,
            writes: o.writes,
            verified: o.verified,
            seconds: o.elapsed.as_secs_f64(),
            histogram_hex,
            reconnects: o.reconnects,
        };
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let interactive =
        args.output_format == OutputFormat::Normal && nix::unistd::isatty(std::io::stderr()).unwrap_or(false);
    let progress = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let progress_thread = (interactive && args.number_ios.is_none() && args.runtime > 1.0).then(|| {
        let runtime = args.runtime;
        let flag = progress.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            while flag.load(std::sync::atomic::Ordering::Relaxed) && t.elapsed().as_secs_f64() < runtime {
                eprint!("\rringbench: {:.0}/{:.0} s ", t.elapsed().as_secs_f64(), runtime);
                std::thread::sleep(Duration::from_millis(250));
            }
            eprint!("\r{}\r", " ".repeat(30));
        })
    });
    let outcomes = if args.processes {
        run_processes(&args, &socket, per_job)?
    } else {
        run_threads(&args, &socket, per_job)?
    };
    progress.store(false, std::sync::atomic::Ordering::Relaxed);
    if let Some(t) = progress_thread {
        let _ = t.join();
    }
    let self_cpu1 = process_cpu();
    let broker_io_threads = if nvmed {
        NvmeSession::open_with(
            &socket,
            SessionOptions { client_name: "ringbench".into(), ..Default::default() },
        )
        .and_then(|s| s.io_threads())
        .ok()
    } else {
        None
    };
    let broker_recovery = embedded.is_some().then(|| recovery(&socket)).transpose()?;
    // A broker that was restarted during the run (the clients reconnected) is not the one
    // measured at the start: its CPU time is not reported.
    let restarted = outcomes.iter().any(|o| o.reconnects > 0);
    let broker_cpu = broker_cpu0.filter(|_| !restarted).map(|(u0, s0)| {
        let (u1, s1) = if embedded.is_some() {
            cpu_of(self_pid, Some("nvmed"))
        } else {
            cpu_of(broker_pid.unwrap(), None)
        };
        Cpu { user_s: u1 - u0, sys_s: s1 - s0 }
    });
    let mut own = Cpu { user_s: self_cpu1.0 - self_cpu0.0, sys_s: self_cpu1.1 - self_cpu0.1 };
    if embedded.is_some() {
        if let Some(b) = &broker_cpu {
            own.user_s -= b.user_s;
            own.sys_s -= b.sys_s;
        }
    }
    let mut total = JobOutcome {
        hist: Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap(),
        reads: 0,
        writes: 0,
        verified: 0,
        elapsed: Duration::ZERO,
        reconnects: 0,
    };
    for o in &outcomes {
        total.reconnects = total.reconnects.max(o.reconnects);
        total.hist.add(&o.hist).unwrap();
        total.reads += o.reads;
        total.writes += o.writes;
        total.verified += o.verified;
        total.elapsed = total.elapsed.max(o.elapsed);
    }
    let rep = Report {
        reconnects: total.reconnects,
        engine: args.engine,
        rw: args.rw,
        bs: args.bs,
        iodepth: args.iodepth,
        submit_batch: job_spec(&args, 0, 0, 0).submit_batch.min(args.iodepth as usize) as u64,
        complete_min: u64::from(args.complete_min.min(args.iodepth)),
        numjobs: args.numjobs,
        verify: args.verify,
        jobs: outcomes.iter().enumerate().map(|(j, o)| report(j as u32, o, args.bs)).collect(),
        total: report(u32::MAX, &total, args.bs),
        ringbench_cpu: own,
        broker_cpu,
        broker_io_threads,
        broker_recovery,
        pingpong_round_trip_ns: None,
    };
    if let Some(b) = embedded.take() {
        b.shutdown()?;
        let _ = std::fs::remove_dir_all(&dir);
    }
    let mut rep = rep;
    if args.machine_state > 0.0 {
        rep.pingpong_round_trip_ns = pingpong(args.machine_state).ok().map(|(median, _, _)| median);
    }
    match args.output_format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&rep)?),
        OutputFormat::Normal => print_report(&rep),
    }
    Ok(())
}

fn job_spec(args: &Args, j: u32, offset: u64, size: u64) -> JobSpec {
    JobSpec {
        id: j,
        workload: Workload::new(
            args.rw,
            args.rwmixread,
            args.bs,
            offset,
            size,
            0x1234_5678 + u64::from(j) * 0x9e37_79b9,
        ),
        iodepth: args.iodepth as usize,
        submit_batch: match (args.submit_batch, args.engine) {
            (0, EngineKind::Nvmed | EngineKind::NvmedNop) => 8,
            (0, _) => usize::MAX,
            (n, _) => n as usize,
        },
        complete_min: args.complete_min as usize,
        bs: args.bs as usize,
        verify: args.verify,
        runtime: Duration::from_secs_f64(args.runtime),
        number_ios: args.number_ios,
    }
}

/// Engines for every job: for nvmed, by default rings of one session sharing one buffer.
fn open_engines(
    args: &Args,
    socket: &Path,
) -> Result<Vec<Box<dyn Engine + Send>>, Box<dyn std::error::Error>> {
    let nvmed = matches!(args.engine, EngineKind::Nvmed | EngineKind::NvmedNop);
    if !nvmed || args.sessions {
        return Ok((0..args.numjobs).map(|_| open_engine(args, socket)).collect::<Result<_, _>>()?);
    }
    let session = NvmeSession::open_with(
        socket,
        SessionOptions { client_name: "ringbench".into(), ..Default::default() },
    )?;
    let slice = u64::from(args.iodepth) * args.bs;
    let shared = session.alloc_shared((slice * u64::from(args.numjobs)) as usize)?;
    let mut engines: Vec<Box<dyn Engine + Send>> = Vec::new();
    for j in 0..u64::from(args.numjobs) {
        engines.push(Box::new(NvmedEngine::on_session(
            &session,
            args.nsid,
            &shared,
            j * slice,
            args.iodepth as usize,
            args.bs as u32,
            args.engine == EngineKind::NvmedNop,
            args.spin_us,
        )?));
    }
    Ok(engines)
}

fn run_threads(
    args: &Args,
    socket: &Path,
    per_job: u64,
) -> Result<Vec<JobOutcome>, Box<dyn std::error::Error>> {
    let engines = open_engines(args, socket)?;
    let handles: Vec<_> = engines
        .into_iter()
        .enumerate()
        .map(|(j, mut engine)| {
            let spec = job_spec(args, j as u32, args.offset + j as u64 * per_job, per_job);
            let cpu = args.job_cpus.as_ref().map(|l| l.0[j % l.0.len()]);
            std::thread::spawn(move || {
                if let Some(cpu) = cpu {
                    pin_to_cpu(cpu);
                }
                run_job(engine.as_mut(), spec).map_err(|e| e.to_string())
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for h in handles {
        outcomes.push(h.join().map_err(|_| "a job panicked")??);
    }
    Ok(outcomes)
}

fn run_processes(
    args: &Args,
    socket: &Path,
    per_job: u64,
) -> Result<Vec<JobOutcome>, Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let name =
        |v: Option<clap::builder::PossibleValue>| v.map(|p| p.get_name().to_string()).unwrap_or_default();
    let mut children = Vec::new();
    for j in 0..args.numjobs {
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("--engine").arg(name(args.engine.to_possible_value()));
        cmd.arg("--socket").arg(socket);
        if let Some(n) = args.nsid {
            cmd.args(["--nsid", &n.to_string()]);
        }
        if let Some(f) = &args.filename {
            cmd.arg("--filename").arg(f);
        }
        cmd.arg("--rw").arg(name(args.rw.to_possible_value()));
        cmd.args(["--rwmixread", &args.rwmixread.to_string(), "--bs", &args.bs.to_string()]);
        cmd.args(["--iodepth", &args.iodepth.to_string(), "--runtime", &args.runtime.to_string()]);
        cmd.args(["--submit-batch", &args.submit_batch.to_string()]);
        cmd.args(["--complete-min", &args.complete_min.to_string()]);
        if let Some(n) = args.number_ios {
            cmd.args(["--number-ios", &n.to_string()]);
        }
        let offset = args.offset + u64::from(j) * per_job;
        cmd.args(["--offset", &offset.to_string(), "--size", &per_job.to_string()]);
        cmd.args(["--spin-us", &args.spin_us.to_string(), "--child-job", &j.to_string()]);
        if args.verify {
            cmd.arg("--verify");
        }
        if let Some(l) = &args.job_cpus {
            // The child pins itself to the `--child-job`th of the list.
            let list: Vec<String> = l.0.iter().map(usize::to_string).collect();
            cmd.args(["--job-cpus", &list.join(",")]);
        }
        children.push(cmd.stdout(std::process::Stdio::piped()).spawn()?);
    }
    let mut outcomes = Vec::new();
    for c in children {
        let out = c.wait_with_output()?;
        if !out.status.success() {
            return Err("a job process failed".into());
        }
        let r: ChildReport = serde_json::from_slice(&out.stdout)?;
        let bytes: Vec<u8> = (0..r.histogram_hex.len() / 2)
            .map(|i| u8::from_str_radix(&r.histogram_hex[2 * i..2 * i + 2], 16))
            .collect::<Result<_, _>>()?;
        let hist: Histogram<u64> = hdrhistogram::serialization::Deserializer::new()
            .deserialize(&mut &bytes[..])
            .map_err(|e| format!("{e:?}"))?;
        outcomes.push(JobOutcome {
            hist,
            reads: r.reads,
            writes: r.writes,
            verified: r.verified,
            elapsed: Duration::from_secs_f64(r.seconds),
            reconnects: r.reconnects,
        });
    }
    Ok(outcomes)
}

fn print_report(r: &Report) {
    println!(
        "ringbench: engine={:?} rw={:?} bs={} iodepth={} submit_batch={} complete_min={} numjobs={}{}",
        r.engine,
        r.rw,
        r.bs,
        r.iodepth,
        r.submit_batch,
        r.complete_min,
        r.numjobs,
        if r.verify { " verify" } else { "" }
    );
    if r.reconnects > 0 {
        println!("ringbench: the broker went away; the clients reconnected {} time(s)", r.reconnects);
    }
    let line = |name: String, j: &JobReport| {
        let l = &j.latency;
        println!(
            "  {name}: {:.0} IOPS, {:.1} MiB/s, {} I/Os ({} reads, {} writes) in {:.2} s{}",
            j.iops,
            j.mib_per_s,
            j.ios,
            j.reads,
            j.writes,
            j.seconds,
            if j.verified_reads > 0 {
                format!(", {} reads verified", j.verified_reads)
            } else {
                String::new()
            }
        );
        println!(
            "    lat (us): mean {:.2} min {:.2} max {:.2} | p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} p99.99 {:.2}",
            l.mean_ns / 1e3,
            l.min_ns as f64 / 1e3,
            l.max_ns as f64 / 1e3,
            l.p50_ns as f64 / 1e3,
            l.p90_ns as f64 / 1e3,
            l.p99_ns as f64 / 1e3,
            l.p99_9_ns as f64 / 1e3,
            l.p99_99_ns as f64 / 1e3
        );
    };
    if r.jobs.len() > 1 {
        for j in &r.jobs {
            line(format!("job {}", j.job), j);
        }
    }
    line("total".into(), &r.total);
    println!("  cpu: ringbench user {:.2}s sys {:.2}s", r.ringbench_cpu.user_s, r.ringbench_cpu.sys_s);
    if let Some(b) = &r.broker_cpu {
        println!("  cpu: broker    user {:.2}s sys {:.2}s", b.user_s, b.sys_s);
    }
    if let Some(t) = &r.broker_io_threads {
        let each: Vec<String> = t
            .iter()
            .enumerate()
            .map(|(i, t)| format!("#{i}: {} device commands", t.device_commands))
            .collect();
        println!("  broker I/O threads: {} ({})", t.len(), each.join(", "));
    }
    if let Some(ns) = r.pingpong_round_trip_ns {
        println!(
            "  machine: cross-core ping-pong (CPU 0 <-> CPU 1) round trip median {ns:.0} ns, after the run"
        );
    }
}

/// Pins the calling thread to one CPU (best effort: says so when it cannot).
fn pin_to_cpu(cpu: usize) {
    // SAFETY: an all-zero cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity only
    // touch that local set.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        eprintln!("ringbench: cannot pin to CPU {cpu}: {}", std::io::Error::last_os_error());
    }
}

/// Round trips of one cache line between CPU 0 and CPU 1 for `secs` seconds, in batches of
/// 1000: (median batch mean, best batch mean) in ns, and the number of round trips.
fn pingpong(secs: f64) -> Result<(f64, f64, u64), Box<dyn std::error::Error>> {
    use std::sync::atomic::{AtomicU64, Ordering};
    if std::thread::available_parallelism()?.get() < 2 {
        return Err("--pingpong needs two CPUs".into());
    }
    const STOP: u64 = u64::MAX;
    let line = Arc::new(AtomicU64::new(0));
    let other = line.clone();
    let partner = std::thread::spawn(move || {
        pin_to_cpu(1);
        loop {
            let v = other.load(Ordering::Acquire);
            if v == STOP {
                break;
            }
            if v % 2 == 1 {
                other.store(v + 1, Ordering::Release);
            }
            std::hint::spin_loop();
        }
    });
    pin_to_cpu(0);
    let mut v = 0u64;
    let mut batches = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end || batches.is_empty() {
        let t0 = Instant::now();
        for _ in 0..1000 {
            line.store(v + 1, Ordering::Release);
            while line.load(Ordering::Acquire) != v + 2 {
                std::hint::spin_loop();
            }
            v += 2;
        }
        batches.push(t0.elapsed().as_nanos() as f64 / 1000.0);
    }
    line.store(STOP, Ordering::Release);
    partner.join().map_err(|_| "ping-pong partner panicked")?;
    batches.sort_by(f64::total_cmp);
    Ok((batches[batches.len() / 2], batches[0], batches.len() as u64 * 1000))
}

/// The embedded broker's recovery counters, once the jobs' sessions are released (waits up to
/// 5 s for that; the figures say what was still held then).
fn recovery(socket: &Path) -> Result<Recovery, Box<dyn std::error::Error>> {
    let session = NvmeSession::open_with(
        socket,
        SessionOptions { client_name: "ringbench-report".into(), ..Default::default() },
    )?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = session.stats()?;
        if (s.broker_buffer_iova_bytes == 0 && s.broker_sessions == 1) || Instant::now() > deadline {
            return Ok(Recovery {
                resets: s.broker_resets,
                aborts: s.broker_aborts,
                retries: s.broker_retries,
                buffer_iova_bytes_after: s.broker_buffer_iova_bytes,
                sessions_after: s.broker_sessions.saturating_sub(1),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Bytes of memory available now (`MemAvailable`), 0 if unknown.
fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// An in-process broker on an emulated controller.
fn start_embedded(
    socket: &Path,
    size: u64,
    args: &Args,
) -> Result<nvmed_server::broker::Broker, Box<dyn std::error::Error>> {
    let (null, io_threads) = (args.null, args.io_threads);
    use nvmed_server::emulator::backend::{Backend, MemoryBackend, NullBackend};
    use nvmed_server::emulator::{EmulatedController, EmulatedNamespace, EmulatorConfig, EmulatorMode};
    let backend: Box<dyn Backend> = if null {
        Box::new(NullBackend::new(size))
    } else if size <= available_memory() / 2 {
        Box::new(MemoryBackend::populated(size)?)
    } else {
        eprintln!(
            "ringbench: the emulated medium ({size} bytes) is more than half the available memory: \
             left mapped lazily (first touches fault, and reads of untouched blocks copy the zero page)"
        );
        Box::new(MemoryBackend::new(size)?)
    };
    let device: Arc<dyn nvmed_server::device::NvmeDevice> =
        Arc::new(EmulatedController::new(EmulatorConfig {
            namespaces: vec![EmulatedNamespace { backend, lba_size: 512 }],
            mdts: 7,
            vectors: io_threads + 1,
            faults: args.inject.clone(),
            mode: match args.device_latency_us {
                Some(us) => EmulatorMode::Async { latency: Duration::from_micros(us) },
                None => EmulatorMode::Sync,
            },
            ..Default::default()
        })?);
    let mut config =
        nvmed_server::broker::BrokerConfig { io_threads, ..nvmed_server::broker::BrokerConfig::new(socket) };
    if let Some(ms) = args.io_timeout_ms {
        config.io_timeout = Duration::from_millis(ms);
    }
    if let Some(cpus) = &args.broker_cpus {
        config.cpus = cpus.0.clone();
    }
    Ok(nvmed_server::broker::Broker::start(device, config)?)
}
