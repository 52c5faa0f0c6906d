//! The single-producer/single-consumer index protocol shared by the SQ and the CQ.
//!
//! Both rings use free-running 32-bit indices: `tail - head` (wrapping) is the number of
//! published, unconsumed entries, and an entry lives at `index & (entries - 1)`.
//! The producer writes entries, then publishes the tail with `Release`; the consumer loads the
//! tail with `Acquire`, copies the entries out, then publishes its head with `Release`; the
//! producer loads the head with `Acquire` before reusing slots.
//!
//! Each side keeps its own index privately and never reads it back from shared memory, so a peer
//! that scribbles over the index it does not own cannot move it. A peer index that claims more
//! than `entries` outstanding entries is reported as [`RingError::Corrupt`].
//!
//! Cross-core traffic: a producer reads the consumer's head only when its cached copy says the
//! ring is full, and may learn the head some other way ([`Producer::observe_head`]: the broker
//! completes a request only after it has copied that request's SQ entry out, and it consumes the
//! SQ in order, so a client that sees a completion knows the SQ slots up to that entry are free).
//! Both sides prefetch a batch's entry lines together ([`Consumer::prefetch`],
//! [`Producer::prefetch_free`]) so the transfers of a batch overlap instead of costing one miss
//! per entry.

use core::sync::atomic::Ordering;
use std::sync::Arc;

use crate::layout::{
    RingLayout, CQ_HEAD_OFFSET, CQ_TAIL_OFFSET, SQ_ENTRIES_OFFSET, SQ_HEAD_OFFSET, SQ_TAIL_OFFSET,
};
use crate::shm::SharedMemory;
use crate::{Cqe, Sqe};

/// The memory a ring lives in: two index words and an entry array.
///
/// Implemented for shared memory ([`SharedRing`]) and, in tests, for loom-checked memory.
pub trait RingMemory {
    /// The entry type.
    type Entry: Copy;
    /// Number of entries (a power of two, from the trusted local layout).
    fn entries(&self) -> u32;
    /// Loads the head word.
    fn load_head(&self, order: Ordering) -> u32;
    /// Stores the head word.
    fn store_head(&self, value: u32, order: Ordering);
    /// Loads the tail word.
    fn load_tail(&self, order: Ordering) -> u32;
    /// Stores the tail word.
    fn store_tail(&self, value: u32, order: Ordering);
    /// Copies entry `slot` (already masked) out.
    fn read_entry(&self, slot: u32) -> Self::Entry;
    /// Writes entry `slot` (already masked).
    fn write_entry(&self, slot: u32, entry: Self::Entry);
    /// Hints that entry `slot` (already masked) will be read soon. Default: nothing.
    fn prefetch_read(&self, _slot: u32) {}
    /// Hints that entry `slot` (already masked) will be written soon. Default: nothing.
    fn prefetch_write(&self, _slot: u32) {}
}

/// Most entries one prefetch call covers.
pub const PREFETCH_MAX: u32 = 64;

/// Prefetches the cache lines of entries `first..first + n` (free-running indices), one hint
/// per line: the misses of a batch then overlap instead of being taken one entry at a time.
fn prefetch_run<M: RingMemory>(mem: &M, first: u32, n: u32, write: bool) {
    let n = n.min(mem.entries()).min(PREFETCH_MAX);
    if n == 0 {
        return;
    }
    let mask = mem.entries() - 1;
    // Entries per 64-byte line (an entry never straddles lines: sizes divide 64).
    let step = (64 / size_of::<M::Entry>().max(1)).max(1) as u32;
    let hint = |i: u32| {
        let slot = first.wrapping_add(i) & mask;
        if write {
            mem.prefetch_write(slot)
        } else {
            mem.prefetch_read(slot)
        }
    };
    let mut i = 0;
    while i < n {
        hint(i);
        i += step;
    }
    hint(n - 1); // the last line, when the run starts mid-line
}

/// The peer published an index that cannot be right.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// `tail - head` exceeds the ring size.
    #[error("ring indices corrupt: head {head}, tail {tail}, entries {entries}")]
    Corrupt {
        /// Head seen.
        head: u32,
        /// Tail seen.
        tail: u32,
        /// Ring size.
        entries: u32,
    },
}

fn outstanding(head: u32, tail: u32, entries: u32) -> Result<u32, RingError> {
    let n = tail.wrapping_sub(head);
    if n > entries {
        Err(RingError::Corrupt { head, tail, entries })
    } else {
        Ok(n)
    }
}

/// The producing side of a ring: owns the tail.
#[derive(Debug)]
pub struct Producer<M: RingMemory> {
    mem: M,
    tail: u32,
    published: u32,
    // Last head seen; the consumer's cache line is read again only when this says "full".
    cached_head: u32,
}

impl<M: RingMemory> Producer<M> {
    /// Starts producing at `tail` (zero on a fresh ring).
    #[inline]
    pub fn new(mem: M, tail: u32) -> Self {
        Self { mem, tail, published: tail, cached_head: tail }
    }

    /// The underlying memory.
    #[inline]
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Free slots, counting entries pushed but not yet published (reads the consumer's head).
    #[inline]
    pub fn free(&mut self) -> Result<u32, RingError> {
        let head = self.mem.load_head(Ordering::Acquire);
        let used = outstanding(head, self.tail, self.mem.entries())?;
        self.cached_head = head;
        Ok(self.mem.entries() - used)
    }

    /// Free slots as of the last head read: never more than [`Producer::free`] would say, and
    /// costs no access to the consumer's cache line.
    #[inline]
    pub fn free_cached(&self) -> u32 {
        self.mem.entries() - self.tail.wrapping_sub(self.cached_head).min(self.mem.entries())
    }

    /// At least `want` free slots if there are, reading the head only when the cache says fewer.
    #[inline]
    pub fn free_at_least(&mut self, want: u32) -> Result<u32, RingError> {
        let cached = self.free_cached();
        if cached >= want {
            return Ok(cached);
        }
        self.free()
    }

    /// Entries pushed and not yet consumed, as seen now.
    #[inline]
    pub fn outstanding(&self) -> Result<u32, RingError> {
        outstanding(self.mem.load_head(Ordering::Acquire), self.tail, self.mem.entries())
    }

    /// Writes one entry without publishing it. Returns `Ok(false)` when the ring is full.
    #[inline]
    pub fn push(&mut self, entry: M::Entry) -> Result<bool, RingError> {
        if self.free_at_least(1)? == 0 {
            return Ok(false);
        }
        self.push_unchecked(entry);
        Ok(true)
    }

    /// Writes one entry after the caller checked [`Producer::free`].
    #[inline]
    pub fn push_unchecked(&mut self, entry: M::Entry) {
        self.mem.write_entry(self.tail & (self.mem.entries() - 1), entry);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Takes note that the consumer's head is at least `head`, learnt some other way than
    /// reading it (the broker completes a request only after consuming its SQ entry). Ignored
    /// unless it lies between the cached head and the tail, so a wrong value can only make the
    /// producer read the head again, never overwrite an unconsumed entry... provided that
    /// whoever reports it is right that the consumer is done with the entries before `head`.
    #[inline]
    pub fn observe_head(&mut self, head: u32) {
        let ahead = head.wrapping_sub(self.cached_head);
        if ahead <= self.tail.wrapping_sub(self.cached_head) {
            self.cached_head = head;
        }
    }

    /// Hints that up to `n` of the free slots (as of the last head read) are about to be
    /// written, so their lines are fetched for writing together.
    #[inline]
    pub fn prefetch_free(&self, n: u32) {
        prefetch_run(&self.mem, self.tail, n.min(self.free_cached()), true);
    }

    /// Entries pushed since the last publish.
    #[inline]
    pub fn unpublished(&self) -> u32 {
        self.tail.wrapping_sub(self.published)
    }

    /// Makes every pushed entry visible to the consumer (`Release` store of the tail).
    #[inline]
    pub fn publish(&mut self) {
        if self.published != self.tail {
            self.mem.store_tail(self.tail, Ordering::Release);
            self.published = self.tail;
        }
    }

    /// The private tail.
    #[inline]
    pub fn tail(&self) -> u32 {
        self.tail
    }
}

/// The consuming side of a ring: owns the head.
#[derive(Debug)]
pub struct Consumer<M: RingMemory> {
    mem: M,
    head: u32,
}

impl<M: RingMemory> Consumer<M> {
    /// Starts consuming at `head` (zero on a fresh ring).
    #[inline]
    pub fn new(mem: M, head: u32) -> Self {
        Self { mem, head }
    }

    /// The underlying memory.
    #[inline]
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Published entries not yet consumed (`Acquire` load of the tail).
    #[inline]
    pub fn available(&self) -> Result<u32, RingError> {
        outstanding(self.head, self.mem.load_tail(Ordering::Acquire), self.mem.entries())
    }

    /// Copies the `n`th available entry out (the caller checked `n < available()`).
    #[inline]
    pub fn read(&self, n: u32) -> M::Entry {
        self.mem.read_entry(self.head.wrapping_add(n) & (self.mem.entries() - 1))
    }

    /// Hints that the next `n` entries (the caller checked `n <= available()`) are about to
    /// be read, so their lines are fetched together.
    #[inline]
    pub fn prefetch(&self, n: u32) {
        prefetch_run(&self.mem, self.head, n, false);
    }

    /// Releases `n` entries to the producer (`Release` store of the head).
    #[inline]
    pub fn consume(&mut self, n: u32) {
        if n > 0 {
            self.head = self.head.wrapping_add(n);
            self.mem.store_head(self.head, Ordering::Release);
        }
    }

    /// Copies out and releases one entry, if any.
    #[inline]
    pub fn pop(&mut self) -> Result<Option<M::Entry>, RingError> {
        if self.available()? == 0 {
            return Ok(None);
        }
        let e = self.read(0);
        self.consume(1);
        Ok(Some(e))
    }

    /// The private head.
    #[inline]
    pub fn head(&self) -> u32 {
        self.head
    }
}

/// One ring (SQ or CQ) inside a ring memfd mapping.
#[derive(Debug, Clone)]
pub struct SharedRing<E> {
    mem: Arc<SharedMemory>,
    head_offset: usize,
    tail_offset: usize,
    entries_offset: usize,
    entries: u32,
    _entry: core::marker::PhantomData<fn() -> E>,
}

impl<E> SharedRing<E> {
    /// The mapping this ring lives in.
    #[inline]
    pub fn mapping(&self) -> &Arc<SharedMemory> {
        &self.mem
    }
}

/// The submission ring of a mapped ring memfd.
pub fn submission_ring(mem: Arc<SharedMemory>, layout: &RingLayout) -> SharedRing<Sqe> {
    assert!(mem.len() >= layout.total_size);
    SharedRing {
        mem,
        head_offset: SQ_HEAD_OFFSET,
        tail_offset: SQ_TAIL_OFFSET,
        entries_offset: SQ_ENTRIES_OFFSET,
        entries: layout.sq_entries,
        _entry: core::marker::PhantomData,
    }
}

/// The completion ring of a mapped ring memfd.
pub fn completion_ring(mem: Arc<SharedMemory>, layout: &RingLayout) -> SharedRing<Cqe> {
    assert!(mem.len() >= layout.total_size);
    SharedRing {
        mem,
        head_offset: CQ_HEAD_OFFSET,
        tail_offset: CQ_TAIL_OFFSET,
        entries_offset: layout.cq_entries_offset,
        entries: layout.cq_entries,
        _entry: core::marker::PhantomData,
    }
}

/// An entry type of a shared ring, and how it is written into the mapping.
pub trait SharedEntry: Copy + zerocopy::FromBytes + zerocopy::IntoBytes + zerocopy::Immutable {
    /// Writes `self` at `offset` of `mem` (default: one volatile copy).
    #[inline]
    fn store(&self, mem: &SharedMemory, offset: usize) {
        mem.write(offset, *self)
    }
}

impl SharedEntry for Cqe {}

impl SharedEntry for Sqe {
    /// Field by field into 8-byte words. The caller just built the entry with a store per
    /// field; copying it with wide loads would make each load wait until those narrow stores
    /// reach the cache (no store forwarding across several stores), i.e. behind every store
    /// still queued, the previous entries' stores to shared lines included.
    #[inline]
    fn store(&self, mem: &SharedMemory, offset: usize) {
        let [s0, s1] = self.segments.to_ne_bytes();
        let [n0, n1, n2, n3] = self.nsid.to_ne_bytes();
        let [l0, l1, l2, l3] = self.len.to_ne_bytes();
        let [b0, b1, b2, b3] = self.buf_id.to_ne_bytes();
        mem.write_words(
            offset,
            [
                u64::from_ne_bytes([self.opcode, self.flags, s0, s1, n0, n1, n2, n3]),
                self.user_data,
                self.offset,
                u64::from_ne_bytes([l0, l1, l2, l3, b0, b1, b2, b3]),
                self.buf_offset,
                self.reserved1[0],
                self.reserved1[1],
                self.reserved1[2],
            ],
        )
    }
}

impl<E: SharedEntry> RingMemory for SharedRing<E> {
    type Entry = E;

    #[inline]
    fn entries(&self) -> u32 {
        self.entries
    }
    #[inline]
    fn load_head(&self, order: Ordering) -> u32 {
        self.mem.load_u32(self.head_offset, order)
    }
    #[inline]
    fn store_head(&self, value: u32, order: Ordering) {
        self.mem.store_u32(self.head_offset, value, order)
    }
    #[inline]
    fn load_tail(&self, order: Ordering) -> u32 {
        self.mem.load_u32(self.tail_offset, order)
    }
    #[inline]
    fn store_tail(&self, value: u32, order: Ordering) {
        self.mem.store_u32(self.tail_offset, value, order)
    }
    #[inline]
    fn read_entry(&self, slot: u32) -> E {
        self.mem.read(self.entries_offset + slot as usize * size_of::<E>())
    }
    #[inline]
    fn write_entry(&self, slot: u32, entry: E) {
        entry.store(&self.mem, self.entries_offset + slot as usize * size_of::<E>())
    }
    #[inline]
    fn prefetch_read(&self, slot: u32) {
        self.mem.prefetch_read(self.entries_offset + slot as usize * size_of::<E>())
    }
    #[inline]
    fn prefetch_write(&self, slot: u32) {
        self.mem.prefetch_write(self.entries_offset + slot as usize * size_of::<E>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqe_store_by_words_writes_the_same_bytes() {
        let mem = SharedMemory::anonymous(4096).unwrap();
        let sqe = Sqe {
            opcode: 0x81,
            flags: 0x42,
            segments: 0xa1b2,
            nsid: 0x0102_0304,
            user_data: 0x1111_2222_3333_4444,
            offset: 0x5555_6666_7777_8888,
            len: 0x99aa_bbcc,
            buf_id: 0xddee_ff01,
            buf_offset: 0x0203_0405_0607_0809,
            reserved1: [0x0a0b, 0x0c0d, 0x0e0f],
        };
        sqe.store(&mem, 64);
        let back: Sqe = mem.read(64);
        assert_eq!(back, sqe);
        let mut bytes = [0u8; 64];
        mem.copy_out(64, &mut bytes);
        assert_eq!(&bytes[..], zerocopy::IntoBytes::as_bytes(&sqe));
    }
}
