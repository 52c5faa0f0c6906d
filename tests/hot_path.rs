//! The per-I/O path allocates nothing: a broker and a client in one process, with a counting
//! global allocator, run thousands of requests after a warm-up and count allocations. The
//! same holds for vectored requests, whether they go to the device with PRPs, with SGLs or
//! through bounce buffers.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nvmed_client::{BufferId, Io, IoSegment, NvmeRing};
use nvmed_server::broker::{Broker, BrokerConfig};
use nvmed_server::device::NvmeDevice;
use nvmed_server::emulator::backend::NullBackend;
use nvmed_server::emulator::{EmulatedController, EmulatedNamespace, EmulatorConfig};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The allocation counter is process-wide: the tests take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run(
    ring: &mut NvmeRing,
    ns: u32,
    buf: nvmed_client::BufferId,
    count: u64,
    out: &mut Vec<nvmed_client::Completion>,
) {
    let mut issued = 0;
    let mut done = 0;
    while done < count {
        while issued < count && ring.in_flight() < 32 {
            let io = match issued % 3 {
                0 => Io::nop(),
                1 => Io::read(ns, (issued % 64) * 4096, 4096, buf, (issued % 32) * 4096),
                _ => Io::write(ns, (issued % 64) * 4096, 4096, buf, (issued % 32) * 4096),
            };
            ring.prep(io.user_data(issued)).unwrap();
            issued += 1;
        }
        ring.submit().unwrap();
        out.clear();
        done += ring.wait(1, out, None).unwrap() as u64;
        assert!(out.iter().all(|c| c.status.is_success()));
    }
}

/// Vectored requests, `depth` in flight, each with its own list slot: page-aligned writes
/// (PRPs), and reads into 512-byte pieces at odd offsets (SGLs, or bounced without them).
fn run_vectored(
    ring: &mut NvmeRing,
    (ns, data, lists): (u32, BufferId, BufferId),
    count: u64,
    free: &mut Vec<u64>,
    out: &mut Vec<nvmed_client::Completion>,
) {
    let depth = free.len() as u64;
    let (mut issued, mut done) = (0, 0);
    while done < count {
        while issued < count && !free.is_empty() {
            let slot = free.pop().unwrap();
            let base = slot * 16384;
            let at = (issued % 64) * 8192;
            if issued % 2 == 0 {
                let segs = [IoSegment::new(data, base + 3584, 512), IoSegment::new(data, base + 8192, 7680)];
                ring.prep_writev(ns, at, &segs, lists, slot * 6144, slot).unwrap();
            } else {
                let segs: [IoSegment; 4] =
                    std::array::from_fn(|i| IoSegment::new(data, base + 512 + i as u64 * 4096, 2048));
                ring.prep_readv(ns, at, &segs, lists, slot * 6144, slot).unwrap();
            }
            issued += 1;
        }
        ring.submit().unwrap();
        out.clear();
        done += ring.wait(1, out, None).unwrap() as u64;
        for c in out.iter() {
            assert!(c.status.is_success(), "{c:?}");
            free.push(c.user_data);
        }
    }
    assert_eq!(free.len() as u64, depth);
}

fn start(dir: &std::path::Path, sgl: bool) -> Broker {
    let device: Arc<dyn NvmeDevice> = Arc::new(
        EmulatedController::new(EmulatorConfig {
            namespaces: vec![EmulatedNamespace {
                backend: Box::new(NullBackend::new(64 << 20)),
                lba_size: 512,
            }],
            mdts: 7,
            vectors: 2,
            faults: vec![],
            sgl,
            ..Default::default()
        })
        .unwrap(),
    );
    let mut config = BrokerConfig::new(dir.join("s.sock"));
    config.poll_idle = std::time::Duration::from_secs(5); // keep the I/O thread polling
    Broker::start(device, config).unwrap()
}

#[test]
fn steady_state_vectored_io_allocates_nothing() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    for sgl in [true, false] {
        let dir = std::env::temp_dir().join(format!("nvmed-hot-v{sgl}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir); // one left by an earlier process with this pid
        std::fs::create_dir_all(&dir).unwrap();
        let broker = start(&dir, sgl);
        let mut ring = NvmeRing::open(dir.join("s.sock")).unwrap();
        let ns = ring.namespaces()[0].nsid;
        let data = ring.alloc_buffer(32 * 16384).unwrap();
        let lists = ring.alloc_buffer(32 * 6144).unwrap();
        let mut free: Vec<u64> = (0..32).collect();
        let mut out = Vec::with_capacity(64);
        run_vectored(&mut ring, (ns, data, lists), 3_000, &mut free, &mut out); // warm-up
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        run_vectored(&mut ring, (ns, data, lists), 20_000, &mut free, &mut out);
        let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
        let s = ring.stats().unwrap();
        assert_eq!(allocations, 0, "{allocations} allocations during 20000 vectored requests (sgl {sgl})");
        if sgl {
            assert!(s.broker_sgl_commands >= 10_000 && s.broker_bounced_bytes == 0, "{s:?}");
        } else {
            assert!(s.broker_sgl_commands == 0 && s.broker_bounced_bytes >= 10_000 * 8192, "{s:?}");
        }
        assert!(s.broker_vectored_prp_commands >= 10_000, "{s:?}");
        drop(ring);
        broker.shutdown().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn steady_state_io_allocates_nothing() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = std::env::temp_dir().join(format!("nvmed-hot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir); // one left by an earlier process with this pid
    std::fs::create_dir_all(&dir).unwrap();
    let broker = start(&dir, true);
    let mut ring = NvmeRing::open(dir.join("s.sock")).unwrap();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(32 * 4096).unwrap();
    let mut out = Vec::with_capacity(64);
    run(&mut ring, ns, buf, 5_000, &mut out); // warm-up: slabs and rings reach their sizes
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    run(&mut ring, ns, buf, 30_000, &mut out);
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    assert_eq!(allocations, 0, "{allocations} allocations during 30000 requests (broker and client)");
    drop(ring);
    broker.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
