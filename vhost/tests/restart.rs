//! The nvmed-vhost binary, SIGKILLed with requests in flight and started again, against a
//! vhost-user frontend doing what QEMU does (vhost's own `Frontend`, guest RAM in a memfd, a
//! virtqueue built in it) and an in-process nvmed whose emulated controller holds each command
//! for a while: the new process gets the inflight region back with SET_INFLIGHT_FD, resubmits
//! exactly the requests taken and not completed, and the guest sees each request completed once,
//! with its data on the disk.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{broker, disk, guest_ram, Env};
use nvmed_server::emulator::EmulatorMode;
use nvmed_vhost::inflight::InflightRegion;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const QUEUE_SIZE: u16 = 256;
const HDR: u64 = 0x8000;
const STATUS: u64 = 0x9000;
const DATA: u64 = 0x10_0000;
/// How long the emulated controller holds each command: the kill lands while they are there.
const LATENCY: Duration = Duration::from_millis(250);

/// An nvmed-vhost process (killed when dropped).
struct Backend {
    child: Child,
    log: PathBuf,
}

impl Backend {
    fn start(env: &Env, sock: &Path, n: usize) -> Self {
        let log = env.dir.join(format!("backend-{n}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_nvmed-vhost"))
            .arg("--socket")
            .arg(sock)
            .arg("--nvmed")
            .arg(&env.socket)
            .args(["--namespace", "1", "--num-queues", "1"])
            .env("NVMED_LOG", "info,nvmed_vhost=debug")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, log }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_until(what: &str, backend: &Backend, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}; backend log:\n{}",
            backend.logs()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// QEMU's side of one connection: negotiation, inflight region, memory table, the ring.
struct Frontside {
    fe: Frontend,
    kick: EventFd,
    _call: EventFd,
}

impl Frontside {
    /// Connects and starts the ring at `base`. `inflight`: the region from an earlier
    /// connection (QEMU sends only SET_INFLIGHT_FD then); None asks for one (GET_INFLIGHT_FD).
    fn connect(
        sock: &Path,
        backend: &Backend,
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<GuestMemoryMmap>,
        inflight: Option<(VhostUserInflight, Arc<File>)>,
        base: u16,
    ) -> (Self, (VhostUserInflight, Arc<File>)) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut fe = loop {
            match Frontend::connect(sock, 1) {
                Ok(fe) => break fe,
                Err(e) => {
                    assert!(Instant::now() < deadline, "connecting: {e}; backend log:\n{}", backend.logs());
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        let protocol = 1u64 << 30; // VHOST_USER_F_PROTOCOL_FEATURES
        assert_ne!(features & protocol, 0);
        fe.set_features((1 << VIRTIO_F_VERSION_1) | protocol).unwrap();
        let pf = fe.get_protocol_features().unwrap();
        assert!(pf.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD), "{pf:?}");
        fe.set_protocol_features(
            pf & (VhostUserProtocolFeatures::INFLIGHT_SHMFD
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG),
        )
        .unwrap();
        // Every later request waits for the backend's acknowledgement.
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let (info, file) = match inflight {
            Some(kept) => kept,
            None => {
                let (info, file) = fe.get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QUEUE_SIZE)).unwrap();
                (info, Arc::new(file))
            }
        };
        fe.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
        let regions: Vec<VhostUserMemoryRegionInfo> =
            mem.iter().map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).unwrap()).collect();
        fe.set_mem_table(&regions).unwrap();
        let va = |gpa: GuestAddress| mem.get_host_address(gpa).unwrap() as u64;
        fe.set_vring_num(0, QUEUE_SIZE).unwrap();
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: va(vq.desc_table_addr()),
                used_ring_addr: va(vq.used_addr()),
                avail_ring_addr: va(vq.avail_addr()),
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(0, base).unwrap();
        let call = EventFd::new(0).unwrap();
        let kick = EventFd::new(0).unwrap();
        fe.set_vring_call(0, &call).unwrap();
        fe.set_vring_kick(0, &kick).unwrap();
        fe.set_vring_enable(0, true).unwrap();
        (Self { fe, kick, _call: call }, (info, file))
    }
}

/// Puts a 4 KiB write of `pattern` to block `block` in the avail ring (descriptors 3n..3n+2).
fn push_write(mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>, n: u16, block: u64) -> Vec<u8> {
    let hdr = HDR + 32 * u64::from(n);
    let data = DATA + 4096 * u64::from(n);
    let status = STATUS + u64::from(n);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    h[8..16].copy_from_slice(&(block * 8).to_le_bytes());
    mem.write_slice(&h, GuestAddress(hdr)).unwrap();
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i as u8).wrapping_mul(7).wrapping_add(n as u8)).collect();
    mem.write_slice(&pattern, GuestAddress(data)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    let base = 3 * n;
    let next = VRING_DESC_F_NEXT as u16;
    let descs = [
        RawDescriptor::from(Descriptor::new(hdr, 16, next, base + 1)),
        RawDescriptor::from(Descriptor::new(data, 4096, next, base + 2)),
        RawDescriptor::from(Descriptor::new(status, 1, VRING_DESC_F_WRITE as u16, 0)),
    ];
    vq.add_desc_chains(&descs, base).unwrap();
    pattern
}

#[test]
fn sigkill_with_requests_in_flight_then_restart_resubmits_them() {
    let env = broker(512, EmulatorMode::Async { latency: LATENCY });
    let sock = env.dir.join("vhost.sock");
    let mem = guest_ram();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);

    let first = Backend::start(&env, &sock, 1);
    let (front, (info, file)) = Frontside::connect(&sock, &first, &mem, &vq, None, 0);
    // Eight writes, all taken by the backend and held by the device.
    let mut want = Vec::new();
    for n in 0..8u16 {
        want.push(push_write(&mem, &vq, n, u64::from(n)));
    }
    front.kick.write(1).unwrap();
    let watch = Arc::new(InflightRegion::map(&file, 0, info.mmap_size, 1, QUEUE_SIZE).unwrap());
    let tracker = watch.queue(0);
    wait_until("the backend took the eight requests", &first, Duration::from_secs(10), || {
        (0..8).all(|n| tracker.is_inflight(3 * n))
    });
    let mut first = first;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let used_at_kill = vq.used().idx().load();
    assert!(used_at_kill < 8, "every request completed before the kill: nothing to resubmit");
    eprintln!("killed with {} of 8 requests in flight", 8 - used_at_kill);
    drop(front);

    // QEMU reconnects: the vring base is the used index, the inflight region the one it kept.
    let second = Backend::start(&env, &sock, 2);
    let (front, _) = Frontside::connect(&sock, &second, &mem, &vq, Some((info, file.clone())), used_at_kill);
    want.push(push_write(&mem, &vq, 8, 8));
    front.kick.write(1).unwrap();
    wait_until("every request is in the used ring", &second, Duration::from_secs(20), || {
        vq.used().idx().load() == 9
    });
    let logs = second.logs();
    assert!(
        logs.contains(&format!("requests={}", 8 - used_at_kill)) && logs.contains("resubmitting"),
        "no resubmission logged:\n{logs}"
    );
    let mut heads: Vec<u32> = (0..9).map(|i| vq.used().ring().ref_at(i).unwrap().load().id()).collect();
    heads.sort_unstable();
    assert_eq!(heads, (0..9).map(|n| 3 * n).collect::<Vec<u32>>(), "each request used exactly once");
    for n in 0..9u64 {
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS + n)).unwrap(), 0, "status of request {n}");
        assert_eq!(disk(&env, n * 4096, 4096), want[n as usize], "block {n}");
    }
    assert!((0..9).all(|n| !tracker.is_inflight(3 * n)), "still marked in flight");
    // A clean stop: every request taken is used, so the ring stops at the used index.
    assert_eq!(front.fe.get_vring_base(0).unwrap(), 9);
}

#[test]
fn ring_settings_the_guest_chose_wrongly_do_not_end_the_connection() {
    // A guest can write any queue size and ring address; QEMU passes them on. The backend
    // does not start such a ring, but keeps the connection (ending it would make QEMU
    // reconnect, and nvmed register and unregister all of guest RAM, at the guest's will).
    let env = broker(512, EmulatorMode::Sync);
    let sock = env.dir.join("vhost.sock");
    let mem = guest_ram();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let backend = Backend::start(&env, &sock, 1);
    let (front, _) = Frontside::connect(&sock, &backend, &mem, &vq, None, 0);
    // The guest resets the queue and sets it up again, wrongly.
    front.fe.get_vring_base(0).unwrap();
    front.fe.set_vring_num(0, 100).unwrap();
    let outside = VringConfigData {
        queue_max_size: QUEUE_SIZE,
        queue_size: QUEUE_SIZE,
        flags: 0,
        desc_table_addr: 0x1000,
        used_ring_addr: 0x2000,
        avail_ring_addr: 0x3000,
        log_addr: None,
    };
    front.fe.set_vring_addr(0, &outside).unwrap();
    front.fe.set_vring_kick(0, &front.kick).unwrap();
    // Still connected and answering.
    front.fe.get_features().unwrap();
    let logs = backend.logs();
    assert!(logs.contains("queue size 100 is not a power of two"), "{logs}");
    assert!(logs.contains("not started: the driver configured it wrongly"), "{logs}");
    assert!(!logs.contains("connection closed"), "{logs}");
}
