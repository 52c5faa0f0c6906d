//! nvmed-tcp's command line: the options `nvmed-tcp --help` shows. A module of its own so that
//! `nvmed-pkg` (pkg/) can build the man page and the shell completions from it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// An NVMe/TCP target (NVMe over Fabrics, TCP transport) in front of the nvmed broker.
///
/// Each host controller (admin queue connection) opens its own nvmed session; each of its I/O
/// queue connections gets its own ring with one buffer registered once, so data moves socket ->
/// registered buffer -> device with no other copy. Which host may use which namespace is decided
/// by host NQN (--allow-host, --allow-any-host, --config); nvmed's grants to this process's
/// uid still apply underneath.
///
/// Connect from a Linux host: nvme connect -t tcp -a ADDR -s 4420 -n NQN (or write
/// "transport=tcp,traddr=ADDR,trsvcid=4420,nqn=NQN,hostnqn=HOSTNQN" to /dev/nvme-fabrics).
/// Discovery (`nvme discover -t tcp -a ADDR -s 4420`, or -s 8009 with --discovery-listen)
/// answers with this subsystem for the hosts allowed to use it.
///
/// Logs go to stderr; NVMED_LOG=debug for more.
#[derive(Debug, Parser)]
#[command(version)]
pub(crate) struct Args {
    /// Address to listen on (hosts may also ask it for the discovery log).
    #[arg(long, default_value = "127.0.0.1:4420")]
    pub(crate) listen: SocketAddr,
    /// Also listen here for discovery only, e.g. 0.0.0.0:8009 (the well-known discovery port):
    /// `nvme discover -t tcp -a ADDR -s 8009` then lists this subsystem to the hosts allowed.
    #[arg(long, value_name = "ADDR")]
    pub(crate) discovery_listen: Option<SocketAddr>,
    /// The nvmed broker's socket.
    #[arg(long, default_value = "/run/nvmed.sock")]
    pub(crate) nvmed: PathBuf,
    /// The subsystem NQN hosts connect to.
    #[arg(long)]
    pub(crate) subsystem: String,
    /// A host NQN allowed to use every exported namespace, read-write (repeatable).
    #[arg(long = "allow-host", value_name = "HOSTNQN")]
    pub(crate) allow_host: Vec<String>,
    /// A host NQN allowed to use every exported namespace, read-only (repeatable).
    #[arg(long = "allow-host-read-only", value_name = "HOSTNQN")]
    pub(crate) allow_host_ro: Vec<String>,
    /// Let any host NQN connect (read-write): for trusted networks only.
    #[arg(long)]
    pub(crate) allow_any_host: bool,
    /// Export only these nvmed namespace ids (repeatable; default: all nvmed grants).
    #[arg(long = "namespace", value_name = "NSID")]
    pub(crate) namespaces: Vec<u32>,
    /// A TOML file of [[host]] entries: nqn, namespaces (optional list), read_only (optional).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// I/O queue entries offered (each entry holds a --max-transfer buffer slot).
    #[arg(long, default_value_t = 128)]
    pub(crate) queue_size: u16,
    /// Largest transfer per command in bytes (MDTS; a power of two).
    #[arg(long, default_value_t = 128 << 10)]
    pub(crate) max_transfer: u32,
    /// In-capsule data accepted with I/O commands, bytes (smaller writes skip the R2T round trip).
    #[arg(long, default_value_t = 8192)]
    pub(crate) in_capsule: u32,
    /// Most I/O queues per controller.
    #[arg(long, default_value_t = 16)]
    pub(crate) max_io_queues: u16,
    /// Most TCP connections at once (each I/O queue connection holds about six file
    /// descriptors: the soft fd limit is raised to the hard one, and this is lowered to fit).
    #[arg(long, default_value_t = 512)]
    pub(crate) max_connections: usize,
    /// Most TCP connections at once from one IP address (a Linux host uses one per queue: 17
    /// for a controller with 16 I/O queues).
    #[arg(long, default_value_t = 128)]
    pub(crate) max_connections_per_host: usize,
    /// Most controllers one host NQN may hold at once (each has its own nvmed session; a host
    /// connecting over several paths holds one per path), so that one host cannot take every
    /// session nvmed allows this target's uid. Further Connects get Controller Busy.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub(crate) max_controllers_per_host: u64,
    /// Seconds a host may leave what is sent to it unread (and to send ICReq and Connect).
    #[arg(long, default_value_t = 30)]
    pub(crate) io_timeout_s: u64,
    /// Most microseconds an I/O queue polls for completions before sleeping (saves a sleep and
    /// a wakeup per I/O at low queue depth; adaptive below that: it shrinks, to none, while
    /// completions take longer; 0: never poll).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub(crate) poll_us: u64,
    /// Threads serving the sockets (every connection is a task; the data moves in nvmed's I/O
    /// threads, so one is often enough, and fewer threads mean fewer cross-thread wakeups).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub(crate) threads: u16,
    /// Seconds to wait for a restarted nvmed when it goes away (killed, crashed, upgraded):
    /// meanwhile the queues pause (hosts see latency, not errors), and the commands that were in
    /// flight are sent again to the new nvmed. After it, those commands fail with Namespace Not
    /// Ready (retryable) and the queue closes. 0: do not wait (also NVMED_RECONNECT=0).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub(crate) reconnect_secs: u64,
}
