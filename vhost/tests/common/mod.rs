//! Shared by the integration tests: an in-process nvmed broker on the emulated controller, and
//! guest RAM in a sealed memfd.

#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use nvmed_client::{NvmeRing, RingOptions};
use nvmed_server::broker::{Broker, BrokerConfig};
use nvmed_server::emulator::backend::MemoryBackend;
use nvmed_server::emulator::{EmulatedController, EmulatedNamespace, EmulatorConfig, EmulatorMode};
use nvmed_vhost::worker::SQ_ENTRIES;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

pub const MIB: u64 = 1 << 20;

/// A broker and its scratch directory (removed on drop).
pub struct Env {
    broker: Option<Broker>,
    pub dir: PathBuf,
    pub socket: PathBuf,
}

impl Env {
    /// Shuts the broker down (it ends every session, draining its I/O first) on another
    /// thread; returns that thread.
    pub fn stop_broker(&mut self) -> std::thread::JoinHandle<()> {
        let b = self.broker.take().expect("the broker runs");
        std::thread::spawn(move || b.shutdown().unwrap())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// nvmed on an emulated controller with one 16 MiB namespace.
pub fn broker(lba_size: u32, mode: EmulatorMode) -> Env {
    broker_with(lba_size, mode, true)
}

/// As [`broker`]; `sgl` false makes the controller PRP-only (like `--emulator-no-sgl`), so nvmed
/// bounces the segment layouts PRPs cannot describe.
impl Env {
    /// Starts a new broker (a fresh emulated controller) on the same socket, after
    /// [`Env::stop_broker`].
    pub fn restart_broker(&mut self, lba_size: u32, mode: EmulatorMode) {
        assert!(self.broker.is_none());
        self.broker = Some(start_broker(&self.socket, lba_size, mode, true));
    }
}

/// A broker on a fresh emulated controller (16 MiB in memory), listening on `socket`.
fn start_broker(socket: &std::path::Path, lba_size: u32, mode: EmulatorMode, sgl: bool) -> Broker {
    let device = Arc::new(
        EmulatedController::new(EmulatorConfig {
            namespaces: vec![EmulatedNamespace {
                backend: Box::new(MemoryBackend::new(16 * MIB).unwrap()),
                lba_size,
            }],
            mdts: 5,
            vectors: 2,
            mode,
            sgl,
            ..Default::default()
        })
        .unwrap(),
    );
    Broker::start(device, BrokerConfig::new(socket)).unwrap()
}

pub fn broker_with(lba_size: u32, mode: EmulatorMode, sgl: bool) -> Env {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "nvmed-vhost-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("nvmed.sock");
    let broker = start_broker(&socket, lba_size, mode, sgl);
    Env { broker: Some(broker), dir, socket }
}

/// A session as nvmed-vhost opens them.
pub fn ring(env: &Env) -> NvmeRing {
    let opts = RingOptions { sq_entries: SQ_ENTRIES, cq_entries: SQ_ENTRIES * 2, ..RingOptions::default() };
    NvmeRing::open_with(&env.socket, opts).unwrap()
}

/// 4 MiB of guest RAM in one sealed memfd, as two regions whose file offsets are swapped
/// (GPA 0 is file offset 2 MiB and GPA 2 MiB is file offset 0), like QEMU's split below 4G.
pub fn guest_ram() -> GuestMemoryMmap {
    let fd =
        nix::sys::memfd::memfd_create("guest-ram", nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING).unwrap();
    let file = Arc::new(File::from(fd));
    file.set_len(4 * MIB).unwrap();
    nix::fcntl::fcntl(file.as_fd(), nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_SHRINK))
        .unwrap();
    let region = |gpa: u64, off: u64| {
        let m = MmapRegion::from_file(FileOffset::from_arc(file.clone(), off), 2 * MIB as usize).unwrap();
        GuestRegionMmap::new(m, GuestAddress(gpa)).unwrap()
    };
    GuestMemoryMmap::from_regions(vec![region(0, 2 * MIB), region(2 * MIB, 0)]).unwrap()
}

/// What a separate nvmed session reads at `offset` (the disk, not the guest's view of it).
pub fn disk(env: &Env, offset: u64, len: u32) -> Vec<u8> {
    let mut r = ring(env);
    let buf = r.alloc_buffer(len as usize).unwrap();
    r.read(1, offset, buf, 0, len).unwrap();
    r.buffer(buf, 0, u64::from(len)).unwrap().to_vec()
}
