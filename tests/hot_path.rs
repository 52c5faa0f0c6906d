//! The per-I/O path allocates nothing: a broker and a client in one process, with a counting
//! global allocator, run thousands of requests after a warm-up and count allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nvmed_client::{Io, NvmeRing};
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

#[test]
fn steady_state_io_allocates_nothing() {
    let dir = std::env::temp_dir().join(format!("nvmed-hot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let device: Arc<dyn NvmeDevice> = Arc::new(
        EmulatedController::new(EmulatorConfig {
            namespaces: vec![EmulatedNamespace {
                backend: Box::new(NullBackend::new(64 << 20)),
                lba_size: 512,
            }],
            mdts: 7,
            vectors: 2,
            faults: vec![],
            ..Default::default()
        })
        .unwrap(),
    );
    let mut config = BrokerConfig::new(dir.join("s.sock"));
    config.poll_idle = std::time::Duration::from_secs(5); // keep the I/O thread polling
    let broker = Broker::start(device, config).unwrap();
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
