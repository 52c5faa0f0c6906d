//! ringbench's command line: the options `ringbench --help` shows. A module of its own so that
//! `nvmed-pkg` (pkg/) can build the man page and the shell completions from it.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use serde::Serialize;

use nvmed_server::cpus::{parse_cpu_list, CpuList};

use super::workload::Rw;

/// Load generator for nvmed, with fio's option names. Each job has its own ring (in a thread)
/// and works on its own slice of the range; with the nvmed engines the jobs share one session
/// unless --sessions gives each its own.
///
/// Without any broker running, `ringbench --embedded` starts one in-process on an emulated
/// controller:
///
///   ringbench --embedded --rw randrw --bs 4k --iodepth 32 --runtime 5 --verify
///
/// The same workload through the kernel:
///
///   ringbench --engine io-uring --filename /dev/shm/f --size 256M --rw randread
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
pub(crate) struct Args {
    /// I/O engine.
    #[arg(long, value_enum, default_value = "nvmed")]
    pub(crate) engine: EngineKind,
    /// nvmed socket (engines nvmed and nvmed-nop).
    #[arg(long, default_value = "/run/nvmed.sock")]
    pub(crate) socket: PathBuf,
    /// Start a broker in this process on an emulated controller instead of using --socket.
    #[arg(long)]
    pub(crate) embedded: bool,
    /// With --embedded: a null namespace (no data movement), to measure the broker alone.
    #[arg(long, requires = "embedded")]
    pub(crate) null: bool,
    /// File or block device (engine io-uring).
    #[arg(long)]
    pub(crate) filename: Option<PathBuf>,
    /// Access pattern.
    #[arg(long, value_enum, default_value = "randread")]
    pub(crate) rw: Rw,
    /// Percentage of reads for randrw.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub(crate) rwmixread: u32,
    /// Block size (suffixes k, m).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    pub(crate) bs: u64,
    /// Requests in flight per job.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub(crate) iodepth: u32,
    /// Requests re-queued after a reap are handed over (submitted) every this many, as fio's
    /// iodepth_batch_submit. 0: the engine's choice, which is 8 for nvmed engines (publishing
    /// costs one store per entry and a fence, and handing requests over early lets the broker
    /// work on them while the rest are prepared) and all of them at once for io_uring (each
    /// submit is a system call).
    #[arg(long, default_value_t = 0)]
    pub(crate) submit_batch: u32,
    /// Each reap waits for at least this many completions (or all in flight, if fewer), as
    /// fio's iodepth_batch_complete_min. Sleeping clients are woken once that many are there
    /// (nvmed: the ring's wake index; io_uring: min_complete), so many jobs sharing few CPUs
    /// switch less. 1: reap whatever is done.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub(crate) complete_min: u32,
    /// Jobs, each in its own thread with its own ring. nvmed engines: the jobs share one
    /// session and one registered buffer (each its own slice), their rings spread over the
    /// broker's I/O threads; see --sessions.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) numjobs: u32,
    /// nvmed engines: the namespace (broker-wide id; default: the first one granted).
    #[arg(long)]
    pub(crate) nsid: Option<u32>,
    /// nvmed engines: a session (and buffer registration) per job instead of one shared.
    #[arg(long)]
    pub(crate) sessions: bool,
    /// With --embedded: broker I/O threads (each with its own device queue).
    #[arg(long, default_value_t = 1, requires = "embedded", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub(crate) io_threads: u16,
    /// With --embedded: pin the broker's I/O threads to these CPUs (as `nvmed --cpus`), e.g. 1
    /// or 2-5. With --job-cpus, keeps a job and the broker thread serving it off each other's
    /// CPU (on a small machine the scheduler may otherwise put both on one for a while).
    #[arg(long, value_name = "LIST", requires = "embedded", value_parser = parse_cpu_list)]
    pub(crate) broker_cpus: Option<CpuList>,
    /// Pin job N to the Nth CPU of this list (round robin), e.g. 0 or 0,2,4.
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub(crate) job_cpus: Option<CpuList>,
    /// With --embedded, testing recovery: inject a fault into the emulated controller, as
    /// `nvmed --inject` (e.g. hang:500, stuck:500, fatal:500, retry:500, gone:500); repeatable.
    /// The report then has the broker's resets, aborts and retries.
    #[arg(long = "inject", value_name = "RULE", requires = "embedded")]
    pub(crate) inject: Vec<nvmed_server::emulator::inject::FaultRule>,
    /// With --embedded: milliseconds before a command at the device is aborted (or its
    /// controller reset).
    #[arg(long, requires = "embedded", value_parser = clap::value_parser!(u64).range(100..))]
    pub(crate) io_timeout_ms: Option<u64>,
    /// With --embedded: the emulated controller completes commands asynchronously, out of
    /// order, this many microseconds after it fetches them (like hardware).
    #[arg(long, requires = "embedded")]
    pub(crate) device_latency_us: Option<u64>,
    /// Run each job in its own process instead of a thread.
    #[arg(long)]
    pub(crate) processes: bool,
    /// Internal: this process is job N of a --processes run.
    #[arg(long, hide = true)]
    pub(crate) child_job: Option<u32>,
    /// Seconds to run (ignored with --number-ios).
    #[arg(long, default_value_t = 5.0)]
    pub(crate) runtime: f64,
    /// Stop each job after this many I/Os.
    #[arg(long)]
    pub(crate) number_ios: Option<u64>,
    /// Bytes of the target to use (default: all of it, or 256M for io-uring on a new file).
    #[arg(long, value_parser = parse_size)]
    pub(crate) size: Option<u64>,
    /// Byte offset where the range starts.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub(crate) offset: u64,
    /// Write a self-checking pattern in every block and check every block read.
    #[arg(long)]
    pub(crate) verify: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "normal")]
    pub(crate) output_format: OutputFormat,
    /// nvmed engines: microseconds a waiting client spins before sleeping on its completion doorbell.
    #[arg(long, default_value_t = 50)]
    pub(crate) spin_us: u64,
    /// Connect --numjobs clients, do no I/O for this many seconds, and report the broker's CPU
    /// use meanwhile (it should sleep).
    #[arg(long, value_name = "SECONDS")]
    pub(crate) idle: Option<f64>,
    /// Machine state only: bounce a cache line between two threads pinned to CPUs 0 and 1 for
    /// this many seconds and print the round trip (what every shared-ring exchange pays; on a
    /// shared VM it shows whether the vCPUs are really running side by side), then exit.
    #[arg(long, value_name = "SECONDS")]
    pub(crate) pingpong: Option<f64>,
    /// After the run, measure that cross-core ping-pong for this many seconds and print it
    /// beside the results (the state of the machine the figures came from; 0: skip).
    #[arg(long, value_name = "SECONDS", default_value_t = 0.1)]
    pub(crate) machine_state: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum EngineKind {
    /// nvmed reads and writes through the client library.
    Nvmed,
    /// nvmed no-op requests: the ring round trip through the broker, no device.
    NvmedNop,
    /// Linux io_uring, O_DIRECT, registered file and buffer.
    IoUring,
    /// Linux io_uring NOPs: the kernel ring's own overhead.
    IoUringNop,
    /// Linux io_uring NVMe passthrough on /dev/ngXnY (--filename).
    IoUringPassthru,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutputFormat {
    Normal,
    Json,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().map(|v| v * mult).map_err(|e| format!("bad size {s:?}: {e}"))
}
