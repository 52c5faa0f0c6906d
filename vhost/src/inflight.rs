//! Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) for split virtqueues.
//!
//! The backend creates a shared memfd (GET_INFLIGHT_FD); QEMU keeps it for the life of the
//! device and hands it back (SET_INFLIGHT_FD) to every backend process it connects to, so a
//! backend that was killed with requests in flight finds them in the region and resubmits them.
//!
//! The layout is the one QEMU's `docs/interop/vhost-user.rst` ("Inflight I/O tracking") gives
//! for split virtqueues, native endian, one region per queue, back to back:
//!
//! ```text
//! queue region (queue_region_len(queue_size) bytes, a multiple of 64):
//!   0  u64 features         (0)
//!   8  u16 version          (1; 0 = not initialised yet)
//!  10  u16 desc_num         (the queue size)
//!  12  u16 last_batch_head  (head of the last batch put in the used ring)
//!  14  u16 used_idx         (the used ring's idx after that batch)
//!  16  desc[desc_num], 16 bytes each:
//!        0  u8  inflight    (1 while the head descriptor's request is taken and not used)
//!        1  u8  padding[5]
//!        6  u16 next        (link of the last batch list)
//!        8  u64 counter     (order in which requests were taken)
//! ```
//!
//! The algorithm ([`QueueInflight`]): [`QueueInflight::begin`] right after popping a chain and
//! before doing anything for it (counter, then inflight = 1); [`QueueInflight::put_begin`]
//! before writing the used element (link the head into the batch list);
//! [`QueueInflight::put_end`] after the used ring's idx was published (inflight = 0, then
//! used_idx). On restart, [`QueueInflight::recover`] repairs the last batch when the ring's used
//! idx moved past `used_idx` (the process died between publishing and clearing) and returns the
//! heads still in flight in counter order. Every store is a Release store into the shared
//! mapping, so a process killed at any instruction leaves the fields in program order.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

/// Region version this backend writes and accepts.
pub const INFLIGHT_VERSION: u16 = 1;
/// Bytes of a queue region's header.
pub const QUEUE_HEADER_LEN: usize = 16;
/// Bytes of one descriptor state.
pub const DESC_STATE_LEN: usize = 16;
/// Queue regions start on this alignment.
pub const QUEUE_ALIGN: usize = 64;

const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const DESC_OFF_INFLIGHT: usize = 0;
const DESC_OFF_NEXT: usize = 6;
const DESC_OFF_COUNTER: usize = 8;

/// Bytes of one queue's region for a queue of `queue_size` entries.
pub fn queue_region_len(queue_size: u16) -> usize {
    (QUEUE_HEADER_LEN + DESC_STATE_LEN * usize::from(queue_size)).next_multiple_of(QUEUE_ALIGN)
}

/// Bytes of the whole region.
pub fn region_len(num_queues: u16, queue_size: u16) -> usize {
    usize::from(num_queues) * queue_region_len(queue_size)
}

/// Why a region QEMU handed over cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// Zero queues or a zero queue size.
    #[error("inflight region for {num_queues} queues of {queue_size} entries is empty")]
    Empty {
        /// Queues.
        num_queues: u16,
        /// Entries per queue.
        queue_size: u16,
    },
    /// The mapping is smaller than the layout needs.
    #[error("inflight region of {size} bytes is smaller than the {needed} bytes {num_queues} queues of {queue_size} entries need")]
    TooSmall {
        /// Size QEMU gave.
        size: u64,
        /// Size needed.
        needed: usize,
        /// Queues.
        num_queues: u16,
        /// Entries per queue.
        queue_size: u16,
    },
    /// The file ends before the mapping would: touching the tail would kill the process
    /// (SIGBUS).
    #[error("inflight region file of {file_size} bytes ends before its mapping ({end} bytes)")]
    PastEof {
        /// The file's size.
        file_size: u64,
        /// Offset plus length of the mapping.
        end: u64,
    },
    /// The file is not a memfd sealed against shrinking, so it could be cut short while mapped.
    #[error("inflight region file is not a memfd sealed against shrinking (seals {seals:#x})")]
    NotSealed {
        /// The seals it has (-1: not a memfd).
        seals: i32,
    },
    /// A queue region of another version or size.
    #[error("inflight region of queue {queue}: version {version} with {desc_num} entries, expected version {INFLIGHT_VERSION} with {queue_size}")]
    Mismatch {
        /// Queue index.
        queue: u16,
        /// Version found.
        version: u16,
        /// desc_num found.
        desc_num: u16,
        /// Queue size expected.
        queue_size: u16,
    },
    /// memfd_create, ftruncate, sealing or mmap failed.
    #[error("inflight region: {what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: io::Error,
    },
}

fn os(what: &'static str) -> impl FnOnce(nix::Error) -> InflightError {
    move |e| InflightError::Os { what, source: e.into() }
}

/// A mapping of the whole inflight region (every queue), shared with QEMU.
#[derive(Debug)]
pub struct InflightRegion {
    ptr: NonNull<u8>,
    len: usize,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the region is plain shared memory owned by this value until drop; every access goes
// through atomics, so it may be used and dropped from any thread.
unsafe impl Send for InflightRegion {}
// SAFETY: as above: only atomic accesses, never a reference to non-atomic data.
unsafe impl Sync for InflightRegion {}

impl InflightRegion {
    /// A fresh, zeroed region in a new memfd (GET_INFLIGHT_FD), every queue header initialised.
    /// Returns the mapping and the memfd to send to QEMU (mmap offset 0, size [`region_len`]).
    pub fn create(num_queues: u16, queue_size: u16) -> Result<(Self, File), InflightError> {
        if num_queues == 0 || queue_size == 0 {
            return Err(InflightError::Empty { num_queues, queue_size });
        }
        let len = region_len(num_queues, queue_size);
        let fd = nix::sys::memfd::memfd_create(
            "nvmed-vhost-inflight",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(os("memfd_create"))?;
        let file = File::from(fd);
        file.set_len(len as u64).map_err(|source| InflightError::Os { what: "ftruncate", source })?;
        // Neither side may shrink it under the other's mapping (SIGBUS).
        nix::fcntl::fcntl(
            file.as_fd(),
            nix::fcntl::FcntlArg::F_ADD_SEALS(
                nix::fcntl::SealFlag::F_SEAL_SHRINK
                    | nix::fcntl::SealFlag::F_SEAL_GROW
                    | nix::fcntl::SealFlag::F_SEAL_SEAL,
            ),
        )
        .map_err(os("sealing"))?;
        let region = Self::map(&file, 0, len as u64, num_queues, queue_size)?;
        Ok((region, file))
    }

    /// Maps the region QEMU handed over (SET_INFLIGHT_FD). Queue headers still zero (a region
    /// another backend created) are initialised; any other version or size is refused.
    pub fn map(
        file: &File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        if num_queues == 0 || queue_size == 0 {
            return Err(InflightError::Empty { num_queues, queue_size });
        }
        let needed = region_len(num_queues, queue_size);
        if size < needed as u64 {
            return Err(InflightError::TooSmall { size, needed, num_queues, queue_size });
        }
        // Sealed first, so the size checked next cannot shrink while mapped.
        let seals = nix::fcntl::fcntl(file.as_fd(), nix::fcntl::FcntlArg::F_GET_SEALS).unwrap_or(-1);
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(InflightError::NotSealed { seals });
        }
        let file_size = file.metadata().map_err(|source| InflightError::Os { what: "fstat", source })?.len();
        let end = offset.saturating_add(needed as u64);
        if end > file_size {
            return Err(InflightError::PastEof { file_size, end });
        }
        let len = std::num::NonZeroUsize::new(needed).expect("checked non-zero");
        let offset = i64::try_from(offset).map_err(|_| InflightError::Os {
            what: "mmap",
            source: io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        // SAFETY: a new shared mapping chosen by the kernel (no address hint), so it cannot
        // alias any Rust object; it stays mapped until `Drop` unmaps it.
        let ptr = unsafe {
            mmap(None, len, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, file, offset)
        }
        .map_err(os("mmap"))?;
        let region = Self { ptr: ptr.cast(), len: needed, num_queues, queue_size };
        for q in 0..num_queues {
            let base = usize::from(q) * queue_region_len(queue_size);
            let version = region.u16_at(base + OFF_VERSION).load(Ordering::Acquire);
            let desc_num = region.u16_at(base + OFF_DESC_NUM).load(Ordering::Acquire);
            match version {
                0 => {
                    region.u16_at(base + OFF_DESC_NUM).store(queue_size, Ordering::Release);
                    region.u16_at(base + OFF_VERSION).store(INFLIGHT_VERSION, Ordering::Release);
                }
                INFLIGHT_VERSION if desc_num == queue_size => {}
                _ => return Err(InflightError::Mismatch { queue: q, version, desc_num, queue_size }),
            }
        }
        Ok(region)
    }

    /// Queues the region covers.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Entries per queue.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: a region has at least one queue of one entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The tracker of queue `index` (which must be below [`InflightRegion::num_queues`]).
    pub fn queue(self: &Arc<Self>, index: u16) -> QueueInflight {
        assert!(index < self.num_queues, "queue {index} outside the inflight region");
        let base = usize::from(index) * queue_region_len(self.queue_size);
        QueueInflight { region: self.clone(), base, desc_num: self.queue_size, counter: 0 }
    }

    fn check(&self, off: usize, size: usize) {
        assert!(
            off + size <= self.len && off.is_multiple_of(size),
            "inflight access {off}+{size} outside the region"
        );
    }

    fn u8_at(&self, off: usize) -> &AtomicU8 {
        self.check(off, 1);
        // SAFETY: `off` is inside the live mapping (checked); the memory is only ever accessed
        // atomically by this process, and lives as long as `self`.
        unsafe { AtomicU8::from_ptr(self.ptr.as_ptr().add(off)) }
    }

    fn u16_at(&self, off: usize) -> &AtomicU16 {
        self.check(off, 2);
        // SAFETY: inside the mapping and 2-byte aligned (checked; the mapping is page aligned),
        // accessed only atomically, lives as long as `self`.
        unsafe { AtomicU16::from_ptr(self.ptr.as_ptr().add(off).cast()) }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        self.check(off, 8);
        // SAFETY: inside the mapping and 8-byte aligned (checked), accessed only atomically,
        // lives as long as `self`.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(off).cast()) }
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once; no reference into it outlives self
        // (the accessors borrow self).
        if let Err(e) = unsafe { munmap(self.ptr.cast(), self.len) } {
            tracing::warn!("unmapping the inflight region: {e}");
        }
    }
}

/// One queue's part of the region, with the counter giving taken requests their order.
#[derive(Debug)]
pub struct QueueInflight {
    region: Arc<InflightRegion>,
    base: usize,
    desc_num: u16,
    counter: u64,
}

impl QueueInflight {
    /// Entries tracked (the queue size QEMU announced).
    pub fn desc_num(&self) -> u16 {
        self.desc_num
    }

    fn desc(&self, head: u16) -> usize {
        self.base + QUEUE_HEADER_LEN + DESC_STATE_LEN * usize::from(head)
    }

    /// A chain with head `head` was taken from the avail ring: record it before acting on it.
    /// Returns false (and tracks nothing) for a head outside the tracked queue size.
    pub fn begin(&mut self, head: u16) -> bool {
        if head >= self.desc_num {
            return false;
        }
        let d = self.desc(head);
        self.region.u64_at(d + DESC_OFF_COUNTER).store(self.counter, Ordering::Release);
        self.counter += 1;
        self.region.u8_at(d + DESC_OFF_INFLIGHT).store(1, Ordering::Release);
        true
    }

    /// About to put `head` in the used ring (a batch of one): link it as the last batch.
    pub fn put_begin(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        let last = self.region.u16_at(self.base + OFF_LAST_BATCH_HEAD).load(Ordering::Relaxed);
        self.region.u16_at(self.desc(head) + DESC_OFF_NEXT).store(last, Ordering::Release);
        self.region.u16_at(self.base + OFF_LAST_BATCH_HEAD).store(head, Ordering::Release);
    }

    /// The used ring's idx is now `used_idx`, `head` included: it is no longer in flight.
    pub fn put_end(&mut self, head: u16, used_idx: u16) {
        if head < self.desc_num {
            self.region.u8_at(self.desc(head) + DESC_OFF_INFLIGHT).store(0, Ordering::Release);
        }
        self.region.u16_at(self.base + OFF_USED_IDX).store(used_idx, Ordering::Release);
    }

    /// Whether `head` is marked in flight.
    pub fn is_inflight(&self, head: u16) -> bool {
        head < self.desc_num
            && self.region.u8_at(self.desc(head) + DESC_OFF_INFLIGHT).load(Ordering::Acquire) != 0
    }

    /// The used idx recorded with the last batch.
    pub fn used_idx(&self) -> u16 {
        self.region.u16_at(self.base + OFF_USED_IDX).load(Ordering::Acquire)
    }

    /// The head of the last batch.
    pub fn last_batch_head(&self) -> u16 {
        self.region.u16_at(self.base + OFF_LAST_BATCH_HEAD).load(Ordering::Acquire)
    }

    /// The counter of `head`.
    pub fn counter_of(&self, head: u16) -> u64 {
        self.region.u64_at(self.desc(head) + DESC_OFF_COUNTER).load(Ordering::Acquire)
    }

    /// On (re)starting the ring whose used idx in guest memory is `ring_used_idx`: repairs the
    /// last batch if the previous process published it without clearing it, and returns the
    /// heads still in flight, oldest first. The next request to take from the avail ring is
    /// then at `ring_used_idx + returned.len()`. New requests are counted after them.
    pub fn recover(&mut self, ring_used_idx: u16) -> Vec<u16> {
        let recorded = self.used_idx();
        if recorded != ring_used_idx {
            // The batch published after `recorded`: its entries are in the used ring.
            let batch = usize::from(ring_used_idx.wrapping_sub(recorded)).min(usize::from(self.desc_num));
            let mut head = self.last_batch_head();
            for _ in 0..batch {
                if head >= self.desc_num {
                    break;
                }
                let d = self.desc(head);
                self.region.u8_at(d + DESC_OFF_INFLIGHT).store(0, Ordering::Release);
                head = self.region.u16_at(d + DESC_OFF_NEXT).load(Ordering::Acquire);
            }
            self.region.u16_at(self.base + OFF_USED_IDX).store(ring_used_idx, Ordering::Release);
        }
        let mut taken: Vec<(u64, u16)> =
            (0..self.desc_num).filter(|&h| self.is_inflight(h)).map(|h| (self.counter_of(h), h)).collect();
        taken.sort_unstable();
        self.counter = taken.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        taken.into_iter().map(|(_, h)| h).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    fn raw(file: &File, off: usize, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        file.read_exact_at(&mut b, off as u64).unwrap();
        b
    }

    fn ne16(b: &[u8]) -> u16 {
        u16::from_ne_bytes(b[..2].try_into().unwrap())
    }

    fn ne64(b: &[u8]) -> u64 {
        u64::from_ne_bytes(b[..8].try_into().unwrap())
    }

    #[test]
    fn layout_matches_the_split_ring_spec() {
        // Header + 128 descriptor states (2064 bytes), rounded up to a multiple of 64.
        assert_eq!(queue_region_len(128), 2112);
        assert_eq!(queue_region_len(1024), 16 + 1024 * 16 + 48);
        assert_eq!(queue_region_len(1), 64);
        let (region, file) = InflightRegion::create(2, 128).unwrap();
        let region = Arc::new(region);
        assert_eq!(file.metadata().unwrap().len() as usize, region_len(2, 128));
        let q1 = queue_region_len(128);
        for base in [0, q1] {
            let h = raw(&file, base, 16);
            assert_eq!(ne64(&h[0..]), 0, "features");
            assert_eq!(ne16(&h[8..]), INFLIGHT_VERSION, "version");
            assert_eq!(ne16(&h[10..]), 128, "desc_num");
        }
        // Queue 1, head 5: counter at +8, inflight at +0 of desc[5].
        let mut t = region.queue(1);
        t.begin(9);
        t.begin(5);
        let d5 = q1 + 16 + 5 * 16;
        assert_eq!(raw(&file, d5, 1), [1]);
        assert_eq!(ne64(&raw(&file, d5 + 8, 8)), 1);
        assert_eq!(ne64(&raw(&file, q1 + 16 + 9 * 16 + 8, 8)), 0);
        // Queue 0 untouched.
        assert!(raw(&file, 16, q1 - 16).iter().all(|&b| b == 0));
        // Put head 5 in the used ring as used idx 7: next = previous last batch head (0),
        // last_batch_head = 5, then inflight = 0 and used_idx = 7.
        t.put_begin(5);
        assert_eq!(ne16(&raw(&file, q1 + 12, 2)), 5);
        assert_eq!(ne16(&raw(&file, d5 + 6, 2)), 0);
        t.put_end(5, 7);
        assert_eq!(raw(&file, d5, 1), [0]);
        assert_eq!(ne16(&raw(&file, q1 + 14, 2)), 7);
        // The file is sealed against resizing.
        assert!(file.set_len(0).is_err());
    }

    #[test]
    fn resubmits_in_counter_order_across_a_restart() {
        let (region, file) = InflightRegion::create(1, 16).unwrap();
        let region = Arc::new(region);
        let mut t = region.queue(0);
        assert_eq!(t.recover(0), Vec::<u16>::new());
        // Taken in this order: 7, 2, 11, 4, 0. 2 and 4 complete (used idx 1, then 2).
        for h in [7, 2, 11, 4, 0] {
            assert!(t.begin(h));
        }
        t.put_begin(2);
        t.put_end(2, 1);
        t.put_begin(4);
        t.put_end(4, 2);
        // Out-of-range heads are not tracked.
        assert!(!t.begin(16));
        drop(t);
        drop(region);
        // A new process maps the region QEMU kept.
        let size = file.metadata().unwrap().len();
        let region = Arc::new(InflightRegion::map(&file, 0, size, 1, 16).unwrap());
        let mut t = region.queue(0);
        assert_eq!(t.recover(2), vec![7, 11, 0]);
        // New requests are ordered after the resubmitted ones.
        t.begin(3);
        assert!(t.counter_of(3) > t.counter_of(0));
        assert_eq!(t.recover(2), vec![7, 11, 0, 3]);
    }

    #[test]
    fn last_batch_published_but_not_cleared_is_not_resubmitted() {
        let (region, _file) = InflightRegion::create(1, 8).unwrap();
        let region = Arc::new(region);
        let mut t = region.queue(0);
        for h in [1, 3, 5] {
            t.begin(h);
        }
        t.put_begin(1);
        t.put_end(1, 1);
        // Head 3: linked and its used element published (ring idx 2), then the process died
        // before clearing it.
        t.put_begin(3);
        assert!(t.is_inflight(3));
        let mut after = region.queue(0);
        assert_eq!(after.recover(2), vec![5]);
        assert!(!after.is_inflight(3));
        assert_eq!(after.used_idx(), 2);
        // The same crash but before the used idx was published (ring idx still 1): head 3
        // was not given back, so it is resubmitted.
        let (region, _file) = InflightRegion::create(1, 8).unwrap();
        let region = Arc::new(region);
        let mut t = region.queue(0);
        for h in [1, 3, 5] {
            t.begin(h);
        }
        t.put_begin(1);
        t.put_end(1, 1);
        t.put_begin(3);
        assert_eq!(region.queue(0).recover(1), vec![3, 5]);
    }

    #[test]
    fn batch_list_is_walked_for_the_batch_size_only() {
        let (region, _file) = InflightRegion::create(1, 8).unwrap();
        let region = Arc::new(region);
        let mut t = region.queue(0);
        for h in [0, 1, 2, 3] {
            t.begin(h);
        }
        // Head 0 used normally (used idx 1); then a batch of 2 (heads 1 and 2) published as used
        // idx 3 by a writer that died before clearing either. Head 0's slot was reused by a new
        // request (head 0 taken again) which must stay in flight even though the batch list
        // links back to it.
        t.put_begin(0);
        t.put_end(0, 1);
        t.begin(0);
        t.put_begin(1);
        t.put_begin(2);
        assert_eq!(region.queue(0).recover(3), vec![3, 0]);
    }

    #[test]
    fn mapping_checks_size_version_and_queue_size() {
        let (_region, file) = InflightRegion::create(2, 64).unwrap();
        let size = file.metadata().unwrap().len();
        assert!(matches!(
            InflightRegion::map(&file, 0, size - 1, 2, 64),
            Err(InflightError::TooSmall { .. })
        ));
        assert!(matches!(InflightRegion::map(&file, 0, size, 2, 32), Err(InflightError::Mismatch { .. })));
        assert!(matches!(InflightRegion::map(&file, 0, size, 0, 64), Err(InflightError::Empty { .. })));
        // A file that could shrink under the mapping, or that ends before it, is refused (an
        // access past its end would kill the process).
        let unsealed =
            File::from(nix::sys::memfd::memfd_create("u", nix::sys::memfd::MFdFlags::empty()).unwrap());
        unsealed.set_len(size).unwrap();
        assert!(matches!(
            InflightRegion::map(&unsealed, 0, size, 2, 64),
            Err(InflightError::NotSealed { .. })
        ));
        let sealed = |len: u64| {
            let f = File::from(
                nix::sys::memfd::memfd_create("s", nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING).unwrap(),
            );
            f.set_len(len).unwrap();
            nix::fcntl::fcntl(
                f.as_fd(),
                nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_SHRINK),
            )
            .unwrap();
            f
        };
        let short = sealed(0);
        assert!(matches!(
            InflightRegion::map(&short, 0, size, 2, 64),
            Err(InflightError::PastEof { file_size: 0, .. })
        ));
        assert!(matches!(InflightRegion::map(&file, 4096, size, 2, 64), Err(InflightError::PastEof { .. })));
        // A zeroed region (another backend's fresh memfd) is initialised.
        let zero = sealed(region_len(1, 4) as u64);
        let r = Arc::new(InflightRegion::map(&zero, 0, region_len(1, 4) as u64, 1, 4).unwrap());
        assert_eq!(r.queue(0).recover(0), Vec::<u16>::new());
        assert_eq!(ne16(&raw(&zero, 8, 2)), INFLIGHT_VERSION);
        assert_eq!(ne16(&raw(&zero, 10, 2)), 4);
    }
}
