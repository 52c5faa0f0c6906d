//! End to end through the request path without vhost-user: a real nvmed broker (in-process, on
//! the emulated controller), guest RAM in a sealed memfd split into two regions, a virtqueue
//! built with virtio-queue's mock, and a queue `Worker` that parses, plans and submits.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmed_server::emulator::EmulatorMode;
use nvmed_vhost::config::DiskGeometry;
use nvmed_vhost::regions::SharedRegions;
use nvmed_vhost::worker::{region_files, QueueStats, Worker};
use nvmed_vhost::StatsSummary;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

mod common;
use common::{broker, broker_with, disk, guest_ram, ring, Env, MIB};

/// The system allocator, counting the allocations of a thread that asked for it
/// ([`allocations_during`]).
struct Counting;

thread_local! {
    // Const-initialised, no destructor: usable from inside the allocator.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn note_allocation() {
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
    }
}

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by this thread while `f` runs.
fn allocations_during(f: impl FnOnce()) -> u64 {
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.with(Cell::get)
}

const HDR: u64 = 0x8000;
const STATUS: u64 = 0x9000;

struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    q: Queue,
    next_desc: u16,
    submitted: u16,
    /// Head descriptor of each request pushed, by request number.
    heads: Vec<u16>,
    worker: Worker,
    stats: Arc<QueueStats>,
}

impl<'a> Guest<'a> {
    fn new(env: &Env, mem: &'a GuestMemoryMmap, geo: Option<DiskGeometry>) -> Self {
        let r = ring(env);
        let ns = r.namespaces()[0];
        let geo = geo.unwrap_or_else(|| DiskGeometry::new(&ns, 1, false));
        let stats = Arc::new(QueueStats::default());
        let mut worker =
            Worker::new(0, r, SharedRegions::default(), geo, Arc::new(AtomicU8::new(1)), stats.clone())
                .unwrap();
        worker.sync_memory(&region_files(mem).unwrap()).unwrap();
        let vq = MockSplitQueue::new(mem, 256);
        let q: Queue = vq.create_queue().unwrap();
        Self { mem, vq, q, next_desc: 0, submitted: 0, heads: Vec::new(), worker, stats }
    }

    /// Puts a request in the avail ring: header at HDR + 32*n, data descriptors, status byte at
    /// STATUS + n. Returns n (its status slot).
    fn push(&mut self, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> u16 {
        let n = self.submitted;
        let hdr = HDR + 32 * u64::from(n);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS + u64::from(n))).unwrap();
        let mut list = vec![(hdr, 16u32, false)];
        list.extend_from_slice(data);
        list.push((STATUS + u64::from(n), 1, true));
        self.push_raw(&list, None);
        n
    }

    /// Adds a chain of descriptors; `loop_to` makes the last one point back at that position.
    fn push_raw(&mut self, list: &[(u64, u32, bool)], loop_to: Option<usize>) {
        let base = self.next_desc;
        let descs: Vec<RawDescriptor> = list
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let last = i + 1 == list.len();
                let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                let mut next = 0;
                if !last || loop_to.is_some() {
                    flags |= VRING_DESC_F_NEXT as u16;
                    next = base + if last { loop_to.unwrap() as u16 } else { i as u16 + 1 };
                }
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect();
        self.vq.add_desc_chains(&descs, base).unwrap();
        self.heads.push(base);
        self.next_desc += list.len() as u16;
        self.submitted += 1;
    }

    /// Runs the worker as for a disabled ring (it takes nothing new) until nothing it took is
    /// left at nvmed.
    fn finish_taken(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.worker.busy() > 0 {
            assert!(Instant::now() < deadline, "the requests taken did not complete");
            self.worker.run(&mut self.q, self.mem, true, false);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs the worker until every pushed request is in the used ring.
    fn drive(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.vq.used().idx().load() != self.submitted {
            assert!(Instant::now() < deadline, "requests did not complete");
            self.worker.run(&mut self.q, self.mem, true, true);
            if self.worker.busy() > 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        assert_eq!(self.worker.busy(), 0);
    }

    fn status(&self, n: u16) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS + u64::from(n))).unwrap()
    }

    /// Used length of request `n` (completions may be out of order).
    fn used_len(&self, n: u16) -> u32 {
        let head = u32::from(self.heads[n as usize]);
        (0..self.vq.used().idx().load())
            .map(|i| self.vq.used().ring().ref_at(i as usize).unwrap().load())
            .find(|e| e.id() == head)
            .expect("request not in the used ring")
            .len()
    }

    fn fill(&self, gpa: u64, len: usize, seed: u8) -> Vec<u8> {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        self.mem.write_slice(&data, GuestAddress(gpa)).unwrap();
        data
    }

    fn read(&self, segs: &[(u64, u32, bool)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(gpa, len, _) in segs {
            let mut b = vec![0u8; len as usize];
            self.mem.read_slice(&mut b, GuestAddress(gpa)).unwrap();
            out.extend(b);
        }
        out
    }
}

/// Data descriptors of a request: (guest address, length, device-writable).
type Descs<'a> = &'a [(u64, u32, bool)];
/// A write from the first descriptors at a sector, read back into the second.
type WriteRead<'a> = (u64, Descs<'a>, Descs<'a>);

/// Drives `requests` (write, then read back into other guest memory) and checks the data on
/// the disk and in the guest. Returns the queue's counters and its nvmed session's.
fn write_read_back(
    lba_size: u32,
    mode: EmulatorMode,
    sgl: bool,
    requests: &[WriteRead],
) -> (StatsSummary, nvmed_client::Stats) {
    let env = broker_with(lba_size, mode, sgl);
    let mem = guest_ram();
    let mut g = Guest::new(&env, &mem, None);
    assert_eq!(g.worker.regions().regions().len(), 2);
    let mut want = Vec::new();
    let mut writes = Vec::new();
    for (i, &(sector, src, _)) in requests.iter().enumerate() {
        let mut data = Vec::new();
        for (j, &(gpa, len, _)) in src.iter().enumerate() {
            data.extend(g.fill(gpa, len as usize, (i * 16 + j) as u8));
        }
        writes.push(g.push(VIRTIO_BLK_T_OUT, sector, src));
        want.push(data);
    }
    g.drive();
    for (i, &(sector, _, _)) in requests.iter().enumerate() {
        assert_eq!(g.status(writes[i]), 0, "write {i}");
        assert_eq!(disk(&env, sector * 512, want[i].len() as u32), want[i], "write {i} on the disk");
    }
    let mut reads = Vec::new();
    for &(sector, _, dst) in requests {
        reads.push(g.push(VIRTIO_BLK_T_IN, sector, dst));
    }
    g.drive();
    for (i, &(_, _, dst)) in requests.iter().enumerate() {
        assert_eq!(g.status(reads[i]), 0, "read {i}");
        assert_eq!(g.used_len(reads[i]), want[i].len() as u32 + 1);
        assert_eq!(g.read(dst), want[i], "read {i} in the guest");
    }
    assert_eq!(g.worker.list_slots_in_use(), 0);
    let session = g.worker.refresh_stats().unwrap();
    (StatsSummary::of(&[g.stats.clone()]), session)
}

/// Page-aligned guest buffers: a descriptor across the boundary of the two RAM regions, pages
/// scattered in guest RAM, a single page, and (512-byte LBAs) a sector in a page.
const ALIGNED: &[WriteRead] = &[
    (8, &[(0x1f_f000, 8192, false)], &[(0x30_0000, 8192, true)]),
    (
        64,
        &[(0x10_4000, 4096, false), (0x10_8000, 4096, false), (0x2a_0000, 16384, false)],
        &[(0x31_0000, 12288, true), (0x1f_e000, 12288, true)],
    ),
    (128, &[(0x12_0000, 4096, false)], &[(0x33_0000, 4096, true)]),
];

#[test]
fn page_aligned_io_bounces_nothing_even_without_sgls() {
    for lba in [512, 4096] {
        // PRP-only controller: every request, vectored or not, still reaches guest RAM directly.
        let (s, session) = write_read_back(lba, EmulatorMode::Sync, false, ALIGNED);
        assert_eq!((s.bounced_bytes, session.bounced_bytes), (0, 0), "{lba}: {s} {session:?}");
        assert_eq!(session.broker_sgl_commands, 0);
        assert!(session.broker_vectored_prp_commands >= 3, "{session:?}");
        // One nvmed request per virtio request.
        assert_eq!((s.requests, s.errors, session.submitted), (6, 0, 6), "{lba}: {s} {session:?}");
        assert_eq!(s.data_bytes, 2 * (8192 + 24576 + 4096));
    }
    // A sector inside a page (what a 512-byte O_DIRECT request of a Linux guest looks like).
    let sector: &[WriteRead] = &[(3, &[(0x11_0200, 512, false)], &[(0x34_0e00, 512, true)])];
    let (s, session) = write_read_back(512, EmulatorMode::Sync, false, sector);
    assert_eq!((s.bounced_bytes, session.submitted), (0, 2), "{s} {session:?}");
}

/// Odd layouts on a 4 KiB-LBA namespace: pieces that are not whole blocks (1 KiB + 3 KiB + a
/// page; 2 KiB at an odd 512 + 6 KiB), and pieces of odd lengths at odd addresses summing to a
/// block. Each request is one nvmed vectored request.
const ODD: &[WriteRead] = &[
    (
        64,
        &[(0x10_0400, 1024, false), (0x10_2000, 3072, false), (0x10_4000, 4096, false)],
        &[(0x31_0200, 2048, true), (0x32_0000, 6144, true)],
    ),
    (
        256,
        &[(0x10_6003, 1000, false), (0x1f_fc01, 3096, false)],
        &[(0x34_0001, 100, true), (0x34_1003, 3000, true), (0x1f_f005, 996, true)],
    ),
];

#[test]
fn odd_layouts_are_one_vectored_request_each_dword_aligned_ones_as_sgls() {
    // Dword-aligned pieces: SGLs straight into guest memory.
    let async_300us = EmulatorMode::Async { latency: Duration::from_micros(300) };
    let (s, session) = write_read_back(4096, async_300us, true, &ODD[..1]);
    assert_eq!((s.bounced_bytes, session.bounced_bytes), (0, 0), "{s} {session:?}");
    assert!(session.broker_sgl_commands >= 2, "{session:?}");
    assert_eq!((s.requests, s.errors, session.submitted), (2, 0, 2), "{s} {session:?}");
    assert_eq!(s.data_bytes, 2 * 8192);
    // Pieces at odd bytes: still one request each, bounced by the broker (odd-byte SGL data
    // blocks are never sent to a device).
    let (s, session) = write_read_back(4096, async_300us, true, &ODD[1..]);
    assert!(session.bounced_bytes > 0, "{s} {session:?}");
    assert_eq!((s.requests, s.errors, session.submitted), (2, 0, 2), "{s} {session:?}");
    assert_eq!(s.data_bytes, 2 * 4096);
}

#[test]
fn odd_layouts_are_bounced_by_nvmed_without_sgls() {
    let (s, session) =
        write_read_back(4096, EmulatorMode::Async { latency: Duration::from_micros(300) }, false, ODD);
    assert!(s.bounced_bytes > 0 && s.bounced_bytes == session.bounced_bytes, "{s} {session:?}");
    assert!(s.bounced_bytes <= 2 * (8192 + 4096), "{s}");
    assert_eq!(session.broker_sgl_commands, 0);
    assert_eq!((s.requests, s.errors, session.submitted), (4, 0, 4), "{s} {session:?}");
}

#[test]
fn a_request_of_many_scattered_sectors_is_one_vectored_request() {
    // 120 sectors, each at an odd 512-byte place of its own page, half in each RAM region.
    let src: Vec<(u64, u32, bool)> =
        (0..120u64).map(|i| (0x10_0000 + i * 0x3000 + (i % 7) * 512, 512, false)).collect();
    let dst: Vec<(u64, u32, bool)> =
        (0..120u64).map(|i| (0x20_0000 + i * 0x2000 + (i % 5) * 512 + 4, 512, true)).collect();
    for sgl in [true, false] {
        let (s, session) = write_read_back(512, EmulatorMode::Sync, sgl, &[(8, &src, &dst)]);
        assert_eq!((s.requests, s.errors, session.submitted), (2, 0, 2), "{s} {session:?}");
        assert_eq!(s.bounced_bytes == 0, sgl, "{s}");
    }
}

#[test]
fn bad_requests_fail_alone_and_the_queue_keeps_serving() {
    let env = broker(512, EmulatorMode::Sync);
    let mem = guest_ram();
    let mut g = Guest::new(&env, &mem, None);
    let good = |g: &mut Guest| g.push(VIRTIO_BLK_T_IN, 0, &[(0x30_0000, 4096, true)]);
    let mut expect = vec![];
    // A descriptor loop: header -> data -> data -> back to the first data descriptor.
    g.push_raw(&[(HDR, 16, false), (0x30_0000, 512, true), (0x30_1000, 512, true)], Some(1));
    expect.push((g.submitted - 1, None));
    expect.push((good(&mut g), Some(0)));
    expect.push((g.push(VIRTIO_BLK_T_IN, 0, &[(0x30_0000, 0, true)]), Some(S_IOERR)));
    expect.push((g.push(VIRTIO_BLK_T_IN, 0, &[(0x50_0000, 512, true)]), Some(S_IOERR))); // outside RAM
    expect.push((g.push(VIRTIO_BLK_T_IN, 0, &[(0x30_0000, 512, false)]), Some(S_IOERR))); // wrong direction
    expect.push((g.push(VIRTIO_BLK_T_OUT, 0, &[(0x30_0000, 512, true)]), Some(S_IOERR))); // wrong direction
    expect.push((g.push(VIRTIO_BLK_T_IN, 0, &[(0x30_0000, 100, true)]), Some(S_IOERR))); // not sectors
    expect.push((g.push(VIRTIO_BLK_T_IN, 32767, &[(0x30_0000, 1024, true)]), Some(S_IOERR))); // past the end
    expect
        .push((g.push(VIRTIO_BLK_T_IN, 0, &[(0x30_0000, 512, true), (0x3f_ff00, 512, true)]), Some(S_IOERR))); // runs out of RAM
    expect.push((g.push(77, 0, &[]), Some(S_UNSUPP)));
    expect.push((g.push(VIRTIO_BLK_T_FLUSH, 0, &[]), Some(0)));
    let id = g.push(VIRTIO_BLK_T_GET_ID, 0, &[(0x34_0000, 20, true)]);
    expect.push((id, Some(0)));
    expect.push((good(&mut g), Some(0)));
    g.drive();
    for (n, want) in expect {
        match want {
            Some(s) => assert_eq!(g.status(n), s, "request {n}"),
            // The looping chain's last descriptor is not a status byte: returned with length 0.
            None => assert_eq!(g.used_len(n), 0, "request {n}"),
        }
    }
    assert_eq!(&g.read(&[(0x34_0000, 9, true)]), b"nvmed-ns1");
    // A status descriptor that is device-readable: nothing can be reported, used length 0.
    g.push_raw(&[(HDR, 16, false), (0x30_0000, 512, true), (STATUS, 1, false)], None);
    let n = g.submitted - 1;
    let ok = good(&mut g);
    g.drive();
    assert_eq!(g.used_len(n), 0);
    assert_eq!(g.status(ok), 0);
}

const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn discard_and_write_zeroes_reach_the_device() {
    let env = broker(512, EmulatorMode::Sync);
    let mem = guest_ram();
    let mut g = Guest::new(&env, &mem, None);
    g.fill(0x10_0000, 65536, 9);
    let w = g.push(VIRTIO_BLK_T_OUT, 0, &[(0x10_0000, 65536, false)]);
    g.drive();
    assert_eq!(g.status(w), 0);
    let seg = |sector: u64, num: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        s
    };
    mem.write_slice(&seg(8, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP), GuestAddress(0x20_0000)).unwrap();
    mem.write_slice(&seg(32, 16, 0), GuestAddress(0x20_0010)).unwrap();
    let wz = g.push(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(0x20_0000, 32, false)]);
    mem.write_slice(&seg(64, 64, 0), GuestAddress(0x20_1000)).unwrap();
    let d = g.push(VIRTIO_BLK_T_DISCARD, 0, &[(0x20_1000, 16, false)]);
    g.drive();
    assert_eq!((g.status(wz), g.status(d)), (0, 0));
    let on_disk = disk(&env, 0, 65536);
    assert!(on_disk[4096..8192].iter().all(|&b| b == 0));
    assert!(on_disk[16384..24576].iter().all(|&b| b == 0));
    assert_eq!(on_disk[..4096], g.read(&[(0x10_0000, 4096, false)])[..]);
    assert_eq!(on_disk[8192..16384], g.read(&[(0x10_2000, 8192, false)])[..]);
}

#[test]
fn read_only_disk_refuses_writes_and_serves_reads() {
    let env = broker(512, EmulatorMode::Sync);
    let mem = guest_ram();
    let ns = ring(&env).namespaces()[0];
    let mut g = Guest::new(&env, &mem, Some(DiskGeometry::new(&ns, 1, true)));
    let w = g.push(VIRTIO_BLK_T_OUT, 0, &[(0x10_0000, 4096, false)]);
    let r = g.push(VIRTIO_BLK_T_IN, 0, &[(0x10_0000, 4096, true)]);
    g.drive();
    assert_eq!((g.status(w), g.status(r)), (S_IOERR, 0));
}

#[test]
fn a_removed_region_is_unregistered_only_after_its_io_completes() {
    let env = broker(512, EmulatorMode::Async { latency: Duration::from_millis(300) });
    let mem = guest_ram();
    let mut g = Guest::new(&env, &mem, None);
    // A read into the region at GPA 2 MiB, in flight at the device for 300 ms.
    let r = g.push(VIRTIO_BLK_T_IN, 0, &[(0x30_0000, 65536, true)]);
    g.worker.run(&mut g.q, &mem, true, true);
    assert_eq!(g.worker.busy(), 1);
    // QEMU removes that region (REM_MEM_REG): only GPA 0..2 MiB stays.
    let mut files = region_files(&mem).unwrap();
    files.retain(|(s, _)| s.gpa == 0);
    g.worker.sync_memory(&files).unwrap();
    assert_eq!(g.worker.regions().regions().len(), 1);
    assert_eq!(g.worker.retiring().len(), 1, "unregistered while its I/O was in flight");
    g.drive();
    assert_eq!(g.status(r), 0);
    assert!(g.worker.retiring().is_empty(), "not unregistered after its I/O completed");
    // Requests into the removed range now fail; the rest of RAM still works.
    let bad = g.push(VIRTIO_BLK_T_IN, 0, &[(0x30_0000, 4096, true)]);
    let good = g.push(VIRTIO_BLK_T_IN, 0, &[(0x10_0000, 4096, true)]);
    g.drive();
    assert_eq!((g.status(bad), g.status(good)), (S_IOERR, 0));
}

#[test]
fn a_disabled_ring_takes_nothing_new_but_completes_what_it_took() {
    let env = broker(512, EmulatorMode::Async { latency: Duration::from_millis(100) });
    let mem = guest_ram();
    let mut g = Guest::new(&env, &mem, None);
    let first = g.push(VIRTIO_BLK_T_IN, 0, &[(0x10_0000, 4096, true)]);
    g.worker.run(&mut g.q, &mem, true, true);
    assert_eq!(g.worker.busy(), 1);
    // SET_VRING_ENABLE(0): the guest's next request stays in the avail ring; the one taken
    // completes.
    let second = g.push(VIRTIO_BLK_T_IN, 0, &[(0x11_0000, 4096, true)]);
    g.finish_taken();
    assert_eq!(
        used_heads(&g),
        [u32::from(g.heads[usize::from(first)])],
        "a disabled ring took a new request"
    );
    // Enabled again: it is taken.
    g.drive();
    assert_eq!(g.status(second), 0);
}

#[test]
fn an_abandoned_ring_gets_nothing_more_written_into_it() {
    // GET_VRING_BASE handed the ring back with a request still at nvmed: when it completes,
    // neither its status byte nor the used ring (the frontend's again) are written.
    let env = broker(512, EmulatorMode::Async { latency: Duration::from_millis(100) });
    let mem = guest_ram();
    let mut g = Guest::new(&env, &mem, None);
    let r = g.push(VIRTIO_BLK_T_IN, 0, &[(0x10_0000, 4096, true)]);
    let status_before = g.status(r);
    g.worker.run(&mut g.q, &mem, true, true);
    assert_eq!(g.worker.busy(), 1);
    g.worker.abandon();
    g.finish_taken();
    assert_eq!(g.vq.used().idx().load(), 0, "a used entry was written into a ring handed back");
    assert_eq!(g.status(r), status_before, "the status byte was written");
}

#[test]
fn many_requests_in_flight_out_of_order_complete_once() {
    let env = broker(512, EmulatorMode::Async { latency: Duration::from_micros(100) });
    let mem = guest_ram();
    let mut g = Guest::new(&env, &mem, None);
    // 40 writes of 4 KiB, each with its own pattern, all in flight together on a device that
    // completes out of order; then 40 reads back into other pages.
    let count = 40u64;
    let mut want = Vec::new();
    for i in 0..count {
        want.push(g.fill(0x10_0000 + i * 4096, 4096, i as u8));
        g.push(VIRTIO_BLK_T_OUT, i * 8, &[(0x10_0000 + i * 4096, 4096, false)]);
    }
    g.drive();
    for i in 0..count {
        g.push(VIRTIO_BLK_T_IN, i * 8, &[(0x30_0000 + i * 4096, 4096, true)]);
    }
    g.drive();
    for i in 0..count {
        assert_eq!(g.read(&[(0x30_0000 + i * 4096, 4096, true)]), want[i as usize], "block {i}");
    }
    let session = g.worker.refresh_stats().unwrap();
    let s = StatsSummary::of(&[g.stats.clone()]);
    assert_eq!((s.requests, s.errors, s.bounced_bytes), (2 * count, 0, 0));
    assert_eq!(session.submitted, 2 * count);
}

/// The queue thread's request path (take the chain, parse, plan, submit to nvmed, reap, status
/// byte, used ring) allocates nothing once the queue is warm: plain and vectored reads and
/// writes and flushes, all in flight together.
#[test]
fn the_request_path_allocates_nothing_once_warm() {
    let env = broker(512, EmulatorMode::Async { latency: Duration::from_micros(50) });
    let mem = guest_ram();
    let mut g = Guest::new(&env, &mem, None);
    let batch = |g: &mut Guest| {
        for i in 0..32u64 {
            let page = 0x10_0000 + i * 4096;
            match i % 4 {
                0 => g.push(VIRTIO_BLK_T_OUT, i * 8, &[(page, 4096, false)]),
                1 => g.push(VIRTIO_BLK_T_IN, i * 8, &[(page, 4096, true)]),
                // Two pieces that are not contiguous: one vectored request in a list slot.
                2 => g.push(VIRTIO_BLK_T_IN, i * 8, &[(page, 2048, true), (page + 0x1_0000, 2048, true)]),
                _ => g.push(VIRTIO_BLK_T_FLUSH, 0, &[]),
            };
        }
    };
    // The first batch grows what the queue keeps (its in-flight table, completion vector).
    batch(&mut g);
    g.drive();
    batch(&mut g);
    let n = allocations_during(|| g.drive());
    assert_eq!(n, 0, "allocations on the request path of 32 requests");
    let s = StatsSummary::of(&[g.stats.clone()]);
    assert_eq!((s.requests, s.errors), (64, 0));
}

/// A guest whose avail index runs more than the queue size ahead (or whose ring cannot be read)
/// gets its queue stopped, not a queue thread spinning on it with the worker locked; the ring
/// serves again once it restarts.
#[test]
fn an_unreadable_avail_ring_stops_the_queue_instead_of_spinning() {
    let env = broker(512, EmulatorMode::Sync);
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(guest_ram()));
    let mut g = Guest::new(&env, mem, None);
    g.push(VIRTIO_BLK_T_IN, 0, &[(0x10_0000, 4096, true)]);
    g.drive();
    let good = g.vq.avail().idx().load();
    // 300 entries claimed on a 256-entry queue.
    g.vq.avail().idx().store(good.wrapping_add(300));
    let (tx, rx) = std::sync::mpsc::channel();
    let (mut worker, mut q) = (g.worker, g.q);
    std::thread::spawn(move || {
        let p = worker.run(&mut q, mem, true, true);
        let again = worker.run(&mut q, mem, true, true);
        let _ = tx.send((p, again, worker, q));
    });
    let (p, again, worker, q) = rx.recv_timeout(Duration::from_secs(20)).expect("the queue thread returned");
    (g.worker, g.q) = (worker, q);
    assert!(!p.any && !again.any, "nothing taken from a ring that cannot be read");
    // Fixed and restarted (as after GET_VRING_BASE / SET_VRING_KICK), it serves again.
    g.vq.avail().idx().store(good);
    g.worker.start_ring(&mut g.q, g.mem);
    g.push(VIRTIO_BLK_T_IN, 8, &[(0x10_0000, 4096, true)]);
    g.drive();
    assert_eq!(g.status(1), 0);
}

#[test]
fn completion_eventfd_wakes_a_sleeping_queue() {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let env = broker(512, EmulatorMode::Async { latency: Duration::from_millis(50) });
    let mem = guest_ram();
    let mut g = Guest::new(&env, &mem, None);
    let r = g.push(VIRTIO_BLK_T_IN, 0, &[(0x30_0000, 4096, true)]);
    g.worker.run(&mut g.q, &mem, true, true);
    assert_eq!(g.worker.busy(), 1);
    // Nothing completed yet: armed, the queue thread may sleep on the fd.
    assert!(!g.worker.arm());
    let mut fds = [PollFd::new(g.worker.completion_fd(), PollFlags::POLLIN)];
    assert_eq!(poll(&mut fds, PollTimeout::from(5000u16)).unwrap(), 1, "no wakeup for the completion");
    g.worker.disarm();
    g.worker.run(&mut g.q, &mem, true, true);
    assert_eq!(g.vq.used().idx().load(), 1);
    assert_eq!(g.status(r), 0);
    // Idle: nothing to arm for.
    assert!(!g.worker.arm());
}

/// A queue woken by something else (a kick) while armed reaps by itself: nvmed stops ringing
/// its doorbell, else every batch it publishes would wake the queue thread again for nothing.
#[test]
fn a_run_ends_the_armed_sleep() {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    // Slow enough that nothing completes before the arm, however busy the machine.
    let env = broker(512, EmulatorMode::Async { latency: Duration::from_millis(500) });
    let mem = guest_ram();
    let mut g = Guest::new(&env, &mem, None);
    for i in 0..16u64 {
        g.push(VIRTIO_BLK_T_IN, i * 8, &[(0x30_0000 + i * 4096, 4096, true)]);
    }
    g.worker.run(&mut g.q, &mem, true, true);
    assert_eq!(g.worker.busy(), 16);
    assert!(!g.worker.arm(), "nothing completed yet: armed");
    // A kick: the thread runs without a completion wakeup.
    g.worker.run(&mut g.q, &mem, true, true);
    // Every read completes meanwhile, published to the queue's ring.
    let t = Instant::now();
    while g.worker.ready_completions() < 16 {
        assert!(t.elapsed() < Duration::from_secs(20), "the 16 reads did not complete");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A doorbell follows the publish it is for at once: give it time to come.
    std::thread::sleep(Duration::from_millis(50));
    let mut fds = [PollFd::new(g.worker.completion_fd(), PollFlags::POLLIN)];
    assert_eq!(poll(&mut fds, PollTimeout::ZERO).unwrap(), 0, "nvmed rang a doorbell nobody waits on");
    g.drive();
    assert!((0..16).all(|r| g.status(r) == 0));
}

/// The doorbell is emptied by a completion wakeup even when the queue no longer counts itself
/// armed (an arm that found completions after nvmed rang): a byte left there would make the
/// queue thread's level-triggered epoll report it for good, an idle thread at 100% CPU.
#[test]
fn a_completion_wakeup_always_empties_the_doorbell() {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let env = broker(512, EmulatorMode::Async { latency: Duration::from_millis(300) });
    let mem = guest_ram();
    let mut g = Guest::new(&env, &mem, None);
    g.push(VIRTIO_BLK_T_IN, 0, &[(0x30_0000, 4096, true)]);
    g.worker.run(&mut g.q, &mem, true, true);
    assert!(!g.worker.arm(), "nothing completed yet: armed");
    let readable = |g: &Guest, ms: u16| {
        let mut fds = [PollFd::new(g.worker.completion_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::from(ms)).unwrap() == 1
    };
    assert!(readable(&g, 5000), "no wakeup for the completion");
    // The thread arms once more before it gets to the event: that arm finds the completion.
    assert!(g.worker.arm(), "the completion was not found");
    g.worker.disarm(); // the wakeup
    assert!(!readable(&g, 0), "the doorbell was left readable");
    g.drive();
}

#[test]
fn a_queue_learns_that_nvmed_ended_its_session_and_fails_what_is_left() {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut env = broker(512, EmulatorMode::Async { latency: Duration::from_millis(300) });
    let mem = guest_ram();
    let mut g = Guest::new(&env, &mem, None);
    let r = g.push(VIRTIO_BLK_T_IN, 0, &[(0x30_0000, 4096, true)]);
    g.worker.run(&mut g.q, &mem, true, true);
    assert_eq!(g.worker.busy(), 1);
    assert!(!g.worker.arm());
    let stopping = env.stop_broker();
    // The queue thread watches the control socket for nothing but its hang-up.
    let mut fds = [PollFd::new(g.worker.control_fd(), PollFlags::empty())];
    assert_eq!(poll(&mut fds, PollTimeout::from(5000u16)).unwrap(), 1, "no hang-up seen");
    assert!(fds[0].revents().unwrap().contains(PollFlags::POLLHUP));
    g.worker.disarm();
    g.worker.broker_gone();
    g.worker.run(&mut g.q, &mem, true, true);
    // The request ended (with its data if nvmed finished it first, else IOERR), and the queue
    // holds nothing: the guest sees an answer, not a hang.
    assert_eq!(g.vq.used().idx().load(), 1);
    assert!(matches!(g.status(r), 0 | 1), "status {}", g.status(r));
    assert_eq!(g.worker.busy(), 0);
    // Later requests fail at once.
    let r2 = g.push(VIRTIO_BLK_T_IN, 8, &[(0x31_0000, 4096, true)]);
    g.worker.run(&mut g.q, &mem, true, true);
    assert_eq!((g.vq.used().idx().load(), g.status(r2)), (2, 1));
    stopping.join().unwrap();
}

#[test]
fn a_queue_reconnects_to_a_restarted_nvmed_and_goes_on() {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mode = EmulatorMode::Async { latency: Duration::from_millis(1) };
    let mut env = broker(512, mode);
    let mem = guest_ram();
    let mut g = Guest::new(&env, &mem, None);
    let data = g.fill(0x30_0000, 4096, 7);
    let w = g.push(VIRTIO_BLK_T_OUT, 0, &[(0x30_0000, 4096, false)]);
    g.drive();
    assert_eq!(g.status(w), 0);
    env.stop_broker().join().unwrap();
    let mut fds = [PollFd::new(g.worker.control_fd(), PollFlags::empty())];
    assert_eq!(poll(&mut fds, PollTimeout::from(5000u16)).unwrap(), 1, "no hang-up seen");
    env.restart_broker(512, mode);
    // What the queue thread does on the hang-up: connect again, then serve as before.
    g.worker.reconnect().unwrap();
    let w = g.push(VIRTIO_BLK_T_OUT, 16, &[(0x30_0000, 4096, false)]);
    let r = g.push(VIRTIO_BLK_T_IN, 16, &[(0x32_0000, 4096, true)]);
    g.drive();
    assert_eq!((g.status(w), g.status(r)), (0, 0));
    assert_eq!(g.read(&[(0x32_0000, 4096, true)]), data);
}

#[test]
fn backend_config_space_and_features_follow_the_namespace() {
    use nvmed_vhost::backend::BlkDevice;
    use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
    use vhost::vhost_user::VhostUserBackendReqHandlerMut;
    let env = broker(4096, EmulatorMode::Sync);
    let r = ring(&env);
    let ns = r.namespaces()[0];
    let geo = DiskGeometry::new(&ns, 1, false);
    let wce = Arc::new(AtomicU8::new(1));
    let w = Worker::new(0, r, SharedRegions::default(), geo, wce.clone(), Arc::default()).unwrap();
    let mut b = BlkDevice::new(geo, vec![w], wce.clone(), Duration::ZERO, 0).unwrap();
    let flags = VhostUserConfigFlags::WRITABLE;
    let cfg = b.get_config(0, 60, flags).unwrap();
    assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), 16 * MIB / 512);
    assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 4096);
    // A read at an offset, and one running past the end (zero filled).
    assert_eq!(b.get_config(20, 4, flags).unwrap(), 4096u32.to_le_bytes());
    assert_eq!(b.get_config(56, 16, flags).unwrap().len(), 16);
    // The guest turns the write cache off: writes become FUA; nothing else is writable.
    b.set_config(32, &[0], flags).unwrap();
    assert_eq!(wce.load(Ordering::Relaxed), 0);
    assert_eq!(b.get_config(32, 1, flags).unwrap(), [0]);
    assert!(b.set_config(0, &[1, 2, 3, 4], flags).is_err());
    let f = b.get_features().unwrap();
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_CONFIG_WCE,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature {bit}");
    }
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(b.get_queue_num().unwrap(), 1);
    let pf = b.get_protocol_features().unwrap();
    for want in [
        VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        VhostUserProtocolFeatures::RESET_DEVICE,
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::CONFIG,
    ] {
        assert!(pf.contains(want), "{want:?}");
    }
    // A device reset keeps what the guest chose (QEMU keeps showing it that).
    b.reset_device().unwrap();
    assert_eq!(wce.load(Ordering::Relaxed), 0);
    // The features decide, as in QEMU's virtio-blk: no FLUSH, write through; FLUSH without
    // CONFIG_WCE, write back; both, the guest's choice.
    let base = f & !((1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_CONFIG_WCE));
    b.set_features(base).unwrap();
    assert_eq!(wce.load(Ordering::Relaxed), 0, "a driver that cannot flush: write through");
    b.set_features(base | (1 << VIRTIO_BLK_F_FLUSH)).unwrap();
    assert_eq!(wce.load(Ordering::Relaxed), 1, "a driver that flushes but cannot choose: write back");
    b.set_features(f).unwrap();
    assert_eq!(wce.load(Ordering::Relaxed), 0, "the guest's choice");
    assert_eq!(b.get_config(32, 1, flags).unwrap(), [0]);
    b.shutdown();

    // The choice outlives the process: a backend started again (QEMU reconnecting does not
    // tell it) writes through, and shows it.
    let file = env.dir.join("vhost.sock.wce");
    let w = Worker::new(0, ring(&env), SharedRegions::default(), geo, wce.clone(), Arc::default()).unwrap();
    wce.store(1, Ordering::Relaxed);
    let mut b = BlkDevice::new(geo, vec![w], wce.clone(), Duration::ZERO, 0).unwrap();
    b.persist_write_cache(file.clone());
    b.set_config(32, &[0], flags).unwrap();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "0\n");
    b.shutdown();
    drop(b);
    wce.store(1, Ordering::Relaxed);
    let w = Worker::new(0, ring(&env), SharedRegions::default(), geo, wce.clone(), Arc::default()).unwrap();
    let mut b = BlkDevice::new(geo, vec![w], wce.clone(), Duration::ZERO, 0).unwrap();
    b.persist_write_cache(file);
    assert_eq!(wce.load(Ordering::Relaxed), 0);
    assert_eq!(b.get_config(32, 1, flags).unwrap(), [0]);
    b.shutdown();
}

/// The used ring's heads, in order.
fn used_heads(g: &Guest) -> Vec<u32> {
    (0..g.vq.used().idx().load())
        .map(|i| g.vq.used().ring().ref_at(i as usize).unwrap().load().id())
        .collect()
}

/// A backend process is killed with requests taken from the virtqueue and not completed (some
/// taken after others that did complete); a new process gets the inflight region back, takes
/// back exactly those, oldest first, and the guest sees every request completed once with the
/// right data.
fn restart_resubmits(mode: EmulatorMode) {
    use nvmed_vhost::inflight::{region_len, InflightRegion};
    let env = broker(512, mode);
    let mem = guest_ram();
    // GET_INFLIGHT_FD: QEMU keeps the memfd; SET_INFLIGHT_FD hands it to each process.
    let (_created, file) = InflightRegion::create(1, 256).unwrap();
    let attach =
        || Arc::new(InflightRegion::map(&file, 0, region_len(1, 256) as u64, 1, 256).unwrap()).queue(0);
    let mut g = Guest::new(&env, &mem, None);
    g.worker.set_inflight(Some(attach()));
    assert_eq!(g.worker.start_ring(&mut g.q, &mem), 0);
    // Phase 1: four writes complete normally.
    let mut want = std::collections::BTreeMap::new();
    for i in 0..4u64 {
        want.insert(i, g.fill(0x10_0000 + i * 4096, 4096, i as u8));
        g.push(VIRTIO_BLK_T_OUT, i * 8, &[(0x10_0000 + i * 4096, 4096, false)]);
    }
    g.drive();
    // Phase 2: a write of block 4, GET_ID (answered at once), a write of block 5, and a third
    // write; taken and submitted, then the process dies before reaping any nvmed completion.
    // On the device that runs commands in order at the doorbell the third writes block 4
    // again from another buffer: resubmitted oldest first, it lands last. (Elsewhere two
    // writes in flight to one block may land in any order, on NVMe as in virtio: block 6.)
    let sync = matches!(mode, EmulatorMode::Sync);
    let writes = [(4u64, 4u64), (5, 5), (if sync { 4 } else { 6 }, 6)];
    let mut taken = Vec::new();
    for (n, &(block, buf)) in writes.iter().enumerate() {
        if n == 1 {
            taken.push(g.push(VIRTIO_BLK_T_GET_ID, 0, &[(0x34_0000, 20, true)]));
        }
        g.fill(0x10_0000 + buf * 4096, 4096, buf as u8);
        taken.push(g.push(VIRTIO_BLK_T_OUT, block * 8, &[(0x10_0000 + buf * 4096, 4096, false)]));
    }
    g.worker.run(&mut g.q, &mem, true, true);
    assert_eq!(g.worker.busy(), 3);
    assert_eq!(g.vq.used().idx().load(), 5, "phase 1 and GET_ID used");
    let heads_before = used_heads(&g);
    // Killed: its nvmed session goes with it (nvmed finishes or drops what it had).
    let ring2 = ring(&env);
    let ns = ring2.namespaces()[0];
    let mut w2 = Worker::new(
        0,
        ring2,
        SharedRegions::default(),
        DiskGeometry::new(&ns, 1, false),
        Arc::new(AtomicU8::new(1)),
        g.stats.clone(),
    )
    .unwrap();
    w2.sync_memory(&region_files(&mem).unwrap()).unwrap();
    drop(std::mem::replace(&mut g.worker, w2));
    // The dead process's writes finish at the device (as the new process waits for before it
    // resubmits). Then the guest's buffers change: what reaches the disk from here on is what
    // the resubmitted writes read, so the disk proves they were sent again, in order (the
    // second write of block 4 last).
    let drained =
        nvmed_client::NvmeSession::open(&env.socket).unwrap().await_drained(Duration::from_secs(10));
    assert!(drained.is_ok(), "{drained:?}");
    for &(block, buf) in &writes {
        want.insert(block, g.fill(0x10_0000 + buf * 4096, 4096, 100 + buf as u8));
    }
    // QEMU reconnects: vring base = the used index (it could not ask the dead backend), the
    // same ring addresses, SET_INFLIGHT_FD with the region, then the kick.
    let mut q: Queue = g.vq.create_queue().unwrap();
    q.set_next_avail(5);
    q.set_next_used(5);
    g.q = q;
    g.worker.set_inflight(Some(attach()));
    assert_eq!(g.worker.start_ring(&mut g.q, &mem), 3);
    assert_eq!(g.q.next_avail(), 8, "used + in flight");
    // One more request after the restart, then everything completes.
    want.insert(7, g.fill(0x10_0000 + 7 * 4096, 4096, 7));
    let after = g.push(VIRTIO_BLK_T_OUT, 7 * 8, &[(0x10_0000 + 7 * 4096, 4096, false)]);
    g.drive();
    let heads = used_heads(&g);
    assert_eq!(heads[..5], heads_before[..]);
    // Every request exactly once in the used ring.
    let mut sorted = heads.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), heads.len(), "a request completed twice: {heads:?}");
    assert_eq!(heads.len(), 9);
    for n in taken.iter().chain([&after]) {
        assert_eq!(g.status(*n), 0, "request {n}");
    }
    for (&block, data) in &want {
        assert_eq!(&disk(&env, block * 4096, 4096), data, "block {block}");
    }
    // Nothing left in flight in the region.
    let mut t = attach();
    assert!(t.recover(9).is_empty());
}

#[test]
fn restart_resubmits_requests_the_device_had_finished() {
    // The emulated controller finishes each command at its doorbell: the data reached the disk
    // but the killed process never put the requests in the used ring.
    restart_resubmits(EmulatorMode::Sync);
}

#[test]
fn restart_resubmits_requests_still_at_the_device() {
    restart_resubmits(EmulatorMode::Async { latency: Duration::from_millis(30) });
}

#[test]
fn two_queues_register_guest_ram_once_and_let_a_removed_region_go_together() {
    let env = broker(512, EmulatorMode::Sync);
    let mem = guest_ram();
    let session = nvmed_client::NvmeSession::open(&env.socket).unwrap();
    let opts = nvmed_client::RingOptions {
        sq_entries: nvmed_vhost::worker::SQ_ENTRIES,
        cq_entries: nvmed_vhost::worker::SQ_ENTRIES * 2,
        ..Default::default()
    };
    let ns = session.namespaces()[0];
    let geo = DiskGeometry::new(&ns, 2, false);
    let regions = SharedRegions::default();
    let wce = Arc::new(AtomicU8::new(1));
    let mut workers: Vec<Worker> = (0..2)
        .map(|i| {
            let ring = session.new_ring_with(opts.clone()).unwrap();
            Worker::new(i, ring, regions.clone(), geo, wce.clone(), Arc::default()).unwrap()
        })
        .collect();
    let files = region_files(&mem).unwrap();
    for w in &mut workers {
        w.sync_memory(&files).unwrap();
    }
    // 4 MiB of guest RAM in two regions, registered once (plus each queue's segment lists).
    let s = session.stats().unwrap();
    assert_eq!(regions.len(), 2);
    assert_eq!(s.buffers, 2 + 2, "{s:?}");
    let lists = workers.len() as u64
        * u64::from(nvmed_vhost::worker::LIST_SLOTS)
        * nvmed_vhost::plan::LIST_SLOT_BYTES;
    assert_eq!(s.buffer_bytes, 4 * MIB + lists, "{s:?}");
    // Both queues use the same buffer for the same region.
    assert_eq!(workers[0].regions().regions(), workers[1].regions().regions());
    // A region removed: unregistered once both queues let it go.
    let kept: Vec<_> = files.iter().filter(|(s, _)| s.gpa == 0).cloned().collect();
    workers[0].sync_memory(&kept).unwrap();
    assert_eq!(session.stats().unwrap().buffers, 4, "queue 1 still uses it");
    workers[1].sync_memory(&kept).unwrap();
    assert_eq!(session.stats().unwrap().buffers, 3);
    assert_eq!(regions.len(), 1);
}
