//! nvmed-vhost's command line: the options `nvmed-vhost --help` shows. A module of its own so
//! that `nvmed-pkg` (pkg/) can build the man page and the shell completions from it.

use std::path::PathBuf;

use clap::Parser;

/// Serve an nvmed namespace to QEMU as a vhost-user-blk disk, zero copy into guest RAM.
///
/// Start nvmed, then this backend, then QEMU with its guest RAM in a shared memfd:
///
///   nvmed --emulate --socket /tmp/nvmed.sock
///   nvmed-vhost --socket /tmp/vhost.sock --nvmed /tmp/nvmed.sock --namespace 1 --num-queues 2
///   qemu-system-x86_64 -machine q35,memory-backend=mem -m 512 \
///     -object memory-backend-memfd,id=mem,size=512M,share=on \
///     -chardev socket,id=c0,path=/tmp/vhost.sock,reconnect=1 \
///     -device vhost-user-blk-pci,chardev=c0,num-queues=2 ...
///
/// One QEMU connection is served at a time; when it ends the backend waits for the next one
/// (a restarted QEMU, or QEMU reconnecting with `-chardev ...,reconnect=1`). With
/// reconnect=1 this process may be killed and started again (same options) while the guest
/// runs: the guest sees a pause, and the requests it had in flight are resubmitted by the new
/// process from the inflight region QEMU keeps. SIGUSR1 prints a
/// stats line (requests, errors, data bytes, bytes nvmed bounced); SIGTERM/SIGINT print it
/// and exit. Logs go to stderr; NVMED_LOG=debug for more.
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
pub(crate) struct Args {
    /// vhost-user socket to listen on (QEMU's `-chardev socket,path=...`); replaced if it exists.
    #[arg(long)]
    pub(crate) socket: PathBuf,
    /// nvmed's control socket.
    #[arg(long, default_value = "/run/nvmed.sock")]
    pub(crate) nvmed: PathBuf,
    /// Namespace to serve (as nvmed lists it to this uid: a granted window appears as a whole
    /// namespace).
    #[arg(long)]
    pub(crate) namespace: u32,
    /// Virtqueues (each gets its own thread and its own ring of the VM's nvmed session). Must be at least QEMU's
    /// `num-queues`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub(crate) num_queues: u16,
    /// Offer a read-only disk (also implied by a read-only nvmed grant).
    #[arg(long)]
    pub(crate) read_only: bool,
    /// Busy-poll each virtqueue this many microseconds (guest notifications off) after the last
    /// request before sleeping: lower latency for a core's worth of CPU per busy queue.
    #[arg(long, default_value_t = 0)]
    pub(crate) poll_us: u64,
    /// Threads serving the virtqueues: queue i is served by thread i % N, each thread running
    /// its queues in turn (fewer threads than queues leave CPU to the guest on a host with few
    /// cores; each queue keeps its own nvmed ring, no lock shared on the request path).
    /// Default: one per queue. Not with --poll-us (a polling queue would hold its thread).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64), conflicts_with = "poll_us")]
    pub(crate) queue_threads: Option<u16>,
}
