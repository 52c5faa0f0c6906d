//! The single-producer/single-consumer protocol shared by the SQ and the CQ.
//!
//! Both rings use free-running 32-bit indices; an entry lives at `index & (entries - 1)`. There
//! is no tail word: every entry carries its own publication tag, written last with `Release`
//! (the SQ's [`Sqe::seq`] = index + 1, the CQ's phase bit [`crate::CQE_PHASE`] in `status`, as
//! NVMe's completion queues do). The consumer loads the tag of the slot it expects next with
//! `Acquire`; if it is the one that index's entry must carry, the entry is published and its
//! copy can be read. So one cache-line transfer brings both the signal and the data, instead of
//! an index line and then the entry lines. The consumer releases slots by storing its head with
//! `Release`; the producer loads it with `Acquire` before reusing slots.
//!
//! The producer stages each entry's tag when it is pushed (an SQE's body is written then, a
//! CQE is staged whole); [`Producer::publish`] stores the staged tags, the first entry's last,
//! so entries become visible exactly at publish (as with a tail store) and a consumer, which
//! looks at the first before the others, finds a whole batch or none of it. A batch's entries
//! are finished together: a CQ line the client is polling moves to the broker once per
//! publish, not once per completion written into it. An SQE has room for the batch's size
//! ([`Sqe::batch`], on the first entry): the broker then reads a batch to its end without
//! looking at the slot after it, the line the client writes next.
//!
//! Each side keeps its own index privately and never reads it back from shared memory, so a peer
//! that scribbles over the index or tags it does not own cannot move it: a wrong tag only means
//! "not published yet", and a head that claims more than `entries` outstanding entries is
//! reported as [`RingError::Corrupt`].
//!
//! Wrap-around: a consumer never looks more than `entries` ahead, and flow control (the heads)
//! keeps the producer within one lap, so a slot holds either the expected entry or the previous
//! lap's, whose tag differs. A ring must start at index 0 on zeroed memory (or on memory whose
//! previous lap was written): zero is no first-lap entry's tag.
//!
//! Cross-core traffic: a producer reads the consumer's head only when its cached copy says the
//! ring is full, and may learn the head some other way ([`Producer::observe_head`]: the broker
//! completes a request only after it has copied that request's SQ entry out, and it consumes the
//! SQ in order, so a client that sees a completion knows the SQ slots up to that entry are free).
//! A consumer that finds the next entry published prefetches as many lines as its previous batch
//! had, and the producer prefetches free slots for writing ([`Producer::prefetch_free`]), so the
//! transfers of a batch overlap instead of costing one miss per entry.

use core::sync::atomic::Ordering;
use std::sync::Arc;

use crate::entry::{CQE_PHASE, CQE_TAG_OFFSET, SQE_TAG_OFFSET};
use crate::layout::{RingLayout, CQ_HEAD_OFFSET, SQ_ENTRIES_OFFSET, SQ_HEAD_OFFSET};
use crate::shm::SharedMemory;
use crate::{Cqe, Sqe};

/// The memory a ring lives in: a head word and an entry array whose entries carry tags.
///
/// Implemented for shared memory ([`SharedRing`]) and, in tests, for loom-checked memory.
/// Entries are addressed by free-running index; implementations mask it themselves.
pub trait RingMemory {
    /// The entry type.
    type Entry: Copy;
    /// The value whose store publishes an entry.
    type Tag: Copy;
    /// Number of entries (a power of two, from the trusted local layout).
    fn entries(&self) -> u32;
    /// Loads the head word.
    fn load_head(&self, order: Ordering) -> u32;
    /// Stores the head word.
    fn store_head(&self, value: u32, order: Ordering);
    /// Writes entry `index` except what publishes it; returns what does (the tag, and for
    /// entries written whole at publish, the entry).
    fn write_body(&self, index: u32, entry: Self::Entry) -> Self::Tag;
    /// Publishes entry `index`: stores its tag with `Release`. `batch` is the number of
    /// entries this publish makes visible when `index` is the first of them, else 0 (a hint
    /// for the consumer, stored where the entry type has room for it).
    fn store_tag(&self, index: u32, tag: Self::Tag, batch: u32);
    /// Whether entry `index` is published (`Acquire` load of its slot's tag): `None` if not,
    /// else the batch hint stored with it (0 when there is none).
    fn published(&self, index: u32) -> Option<u32>;
    /// Copies entry `index` out (the caller saw it published).
    fn read_entry(&self, index: u32) -> Self::Entry;
    /// Hints that entry `index` will be read soon. Default: nothing.
    fn prefetch_read(&self, _index: u32) {}
    /// Hints that entry `index` will be written soon. Default: nothing.
    fn prefetch_write(&self, _index: u32) {}
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
    // Entries per 64-byte line (an entry never straddles lines: sizes divide 64).
    let step = (64 / size_of::<M::Entry>().max(1)).max(1) as u32;
    let hint = |i: u32| {
        let index = first.wrapping_add(i);
        if write {
            mem.prefetch_write(index)
        } else {
            mem.prefetch_read(index)
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
    // Tags of the entries `published..tail`, stored by `publish` (capacity: the ring's size).
    staged: Vec<M::Tag>,
}

impl<M: RingMemory> Producer<M> {
    /// Starts producing at `tail` (zero on a fresh ring).
    #[inline]
    pub fn new(mem: M, tail: u32) -> Self {
        let staged = Vec::with_capacity(mem.entries() as usize);
        Self { mem, tail, published: tail, cached_head: tail, staged }
    }

    /// The underlying memory.
    #[inline]
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Free slots, counting entries pushed but not yet published (reads the consumer's head).
    /// A head ahead of the published entries (no consumer can have taken an entry it could not
    /// see) or more than a ring behind them is [`RingError::Corrupt`]: staged entries never
    /// outnumber the ring, whatever the consumer writes.
    #[inline]
    pub fn free(&mut self) -> Result<u32, RingError> {
        let head = self.mem.load_head(Ordering::Acquire);
        let entries = self.mem.entries();
        let used = outstanding(head, self.published, entries)? + self.unpublished();
        if used > entries {
            return Err(RingError::Corrupt { head, tail: self.tail, entries });
        }
        self.cached_head = head;
        Ok(entries - used)
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
        let used = outstanding(self.mem.load_head(Ordering::Acquire), self.published, self.mem.entries())?;
        Ok(used + self.unpublished())
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

    /// Writes one entry (all but its tag) after the caller checked [`Producer::free`].
    #[inline]
    pub fn push_unchecked(&mut self, entry: M::Entry) {
        debug_assert!(self.staged.len() < self.mem.entries() as usize, "pushed without room");
        let tag = self.mem.write_body(self.tail, entry);
        self.staged.push(tag);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Takes note that the consumer's head is at least `head`, learnt some other way than
    /// reading it (the broker completes a request only after consuming its SQ entry). Ignored
    /// unless it lies between the cached head and the published entries, so a wrong value can
    /// only make the producer read the head again, never overwrite an unconsumed entry...
    /// provided that whoever reports it is right that the consumer is done with the entries
    /// before `head`.
    #[inline]
    pub fn observe_head(&mut self, head: u32) {
        let ahead = head.wrapping_sub(self.cached_head);
        if ahead <= self.published.wrapping_sub(self.cached_head) {
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

    /// Makes every pushed entry visible to the consumer: stores their tags, each with
    /// `Release`, the first one last and with the batch's size. A consumer looks at the first
    /// entry before the others, so it finds the whole batch or none of it, and knows where the
    /// batch ends without looking at the slot after it.
    #[inline]
    pub fn publish(&mut self) {
        let n = self.staged.len() as u32;
        let first = self.published;
        let mut tags = self.staged.drain(..);
        let Some(first_tag) = tags.next() else { return };
        for (i, tag) in tags.enumerate() {
            self.mem.store_tag(first.wrapping_add(i as u32 + 1), tag, 0);
        }
        self.mem.store_tag(first, first_tag, n);
        self.published = self.tail;
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
    // Entries from `head` already seen published (never a cached "not published").
    seen: u32,
    // Entries from `head` that the producer said it published together (the batch hint of the
    // batch `head` is in; 0: no hint, look until an entry is not published).
    announced: u32,
    // How many were found in the last scan: that many lines are prefetched on the next one
    // when there is no hint.
    last_batch: u32,
}

impl<M: RingMemory> Consumer<M> {
    /// Starts consuming at `head` (zero on a fresh ring).
    #[inline]
    pub fn new(mem: M, head: u32) -> Self {
        Self { mem, head, seen: 0, announced: 0, last_batch: 1 }
    }

    /// The underlying memory.
    #[inline]
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// How many entries from the head, up to `max` (and the ring's size), are published: the
    /// length of the run of entries whose tags are the expected ones. Reads the tag of the next
    /// unseen entry with `Acquire`; only when the first is published does it look further,
    /// after prefetching the lines of the batch. A batch whose first entry carries its size
    /// (the SQ's) is read to its end and no further, so the slot after it (the producer's next)
    /// is not touched; without a size it looks until an entry is not published.
    #[inline]
    pub fn ready(&mut self, max: u32) -> u32 {
        let entries = self.mem.entries();
        let max = max.min(entries);
        if self.seen < max {
            if self.seen == 0 {
                let Some(batch) = self.mem.published(self.head) else { return 0 };
                self.seen = 1;
                if self.announced == 0 {
                    // `head` starts a batch: its hint (untrusted, only bounds the look) says
                    // how far the batch goes.
                    self.announced = batch.min(entries);
                }
                // Not bounded by `max`: a first look is often `ready(1)` ("any work?"), and the
                // take that follows finds the lines on their way.
                let more = if self.announced > 0 { self.announced } else { self.last_batch.min(max) };
                prefetch_run(&self.mem, self.head.wrapping_add(1), more.saturating_sub(1), false);
            }
            let limit = if self.announced > 0 { self.announced.min(max) } else { max };
            while self.seen < limit && self.mem.published(self.head.wrapping_add(self.seen)).is_some() {
                self.seen += 1;
            }
            self.last_batch = self.seen;
        }
        self.seen.min(max)
    }

    /// Copies the `n`th entry from the head out (the caller saw `n < ready(..)`).
    #[inline]
    pub fn read(&self, n: u32) -> M::Entry {
        debug_assert!(n < self.seen, "reading an entry not seen published");
        self.mem.read_entry(self.head.wrapping_add(n))
    }

    /// Releases `n` entries (at most those seen ready) to the producer (`Release` store of the
    /// head).
    #[inline]
    pub fn consume(&mut self, n: u32) {
        if n > 0 {
            debug_assert!(n <= self.seen, "consuming entries not seen published");
            self.seen = self.seen.saturating_sub(n);
            self.announced = self.announced.saturating_sub(n);
            self.head = self.head.wrapping_add(n);
            self.mem.store_head(self.head, Ordering::Release);
        }
    }

    /// Copies out and releases one entry, if one is published.
    #[inline]
    pub fn pop(&mut self) -> Option<M::Entry> {
        if self.ready(1) == 0 {
            return None;
        }
        let e = self.read(0);
        self.consume(1);
        Some(e)
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

    #[inline]
    fn offset(&self, index: u32) -> usize {
        self.entries_offset + (index & (self.entries - 1)) as usize * size_of::<E>()
    }
}

/// The submission ring of a mapped ring memfd.
pub fn submission_ring(mem: Arc<SharedMemory>, layout: &RingLayout) -> SharedRing<Sqe> {
    assert!(mem.len() >= layout.total_size);
    SharedRing {
        mem,
        head_offset: SQ_HEAD_OFFSET,
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
        entries_offset: layout.cq_entries_offset,
        entries: layout.cq_entries,
        _entry: core::marker::PhantomData,
    }
}

/// An entry type of a shared ring: how it is written into the mapping and how it is tagged.
pub trait SharedEntry: Copy + zerocopy::FromBytes + zerocopy::IntoBytes + zerocopy::Immutable {
    /// The value whose store publishes an entry.
    type Tag: Copy;
    /// Writes what of `self` goes before the tag (all but the tag word, or nothing) at
    /// `offset`, as entry `index` of a ring of `entries`; returns the tag that publishes it
    /// (with whatever of the entry was not written yet).
    fn write_body(&self, mem: &SharedMemory, offset: usize, index: u32, entries: u32) -> Self::Tag;
    /// Stores `tag` into the entry at `offset`, its publishing word last with `Release`, with
    /// the batch hint `batch` where the entry has room for one.
    fn store_tag(mem: &SharedMemory, offset: usize, tag: Self::Tag, batch: u32);
    /// Whether the entry at `offset` carries the tag of entry `index` (`Acquire` load), and
    /// then its batch hint (0 where the entry has none).
    fn published(mem: &SharedMemory, offset: usize, index: u32, entries: u32) -> Option<u32>;
}

impl SharedEntry for Cqe {
    /// The whole entry, with the phase bit of `index`'s lap: nothing of a CQE is written
    /// before it is published. The client polls the line of the next CQE, which holds four:
    /// writing each entry as it completes would let the client take that line away between
    /// the broker's stores (a transfer each); written at publish, a line goes over once.
    type Tag = Cqe;

    #[inline]
    fn write_body(&self, _mem: &SharedMemory, _offset: usize, index: u32, entries: u32) -> Cqe {
        Cqe { status: (self.status & !CQE_PHASE) | Cqe::phase_for(index, entries), ..*self }
    }

    /// `user_data`, then the word of `status` and `result` with `Release` (no room for a
    /// batch hint).
    #[inline]
    fn store_tag(mem: &SharedMemory, offset: usize, tag: Cqe, _batch: u32) {
        mem.write::<u64>(offset, tag.user_data);
        let [s0, s1, s2, s3] = tag.status.to_ne_bytes();
        let [r0, r1, r2, r3] = tag.result.to_ne_bytes();
        let word = u64::from_ne_bytes([s0, s1, s2, s3, r0, r1, r2, r3]);
        mem.store_u64(offset + CQE_TAG_OFFSET, word, Ordering::Release)
    }

    #[inline]
    fn published(mem: &SharedMemory, offset: usize, index: u32, entries: u32) -> Option<u32> {
        let word = mem.load_u64(offset + CQE_TAG_OFFSET, Ordering::Acquire);
        let [s0, s1, s2, s3, ..] = word.to_ne_bytes();
        (u32::from_ne_bytes([s0, s1, s2, s3]) & CQE_PHASE == Cqe::phase_for(index, entries)).then_some(0)
    }
}

impl SharedEntry for Sqe {
    /// [`Sqe::seq_for`] the entry's index.
    type Tag = u32;

    // The tag word is bytes 56..64: `batch`, then `seq`, stored together.

    /// Field by field into 8-byte words. The caller just built the entry with a store per
    /// field; copying it with wide loads would make each load wait until those narrow stores
    /// reach the cache (no store forwarding across several stores), i.e. behind every store
    /// still queued, the previous entries' stores to shared lines included.
    #[inline]
    fn write_body(&self, mem: &SharedMemory, offset: usize, index: u32, _entries: u32) -> u32 {
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
            ],
        );
        Sqe::seq_for(index)
    }

    #[inline]
    fn store_tag(mem: &SharedMemory, offset: usize, seq: u32, batch: u32) {
        let [b0, b1, b2, b3] = batch.to_ne_bytes();
        let [q0, q1, q2, q3] = seq.to_ne_bytes();
        let word = u64::from_ne_bytes([b0, b1, b2, b3, q0, q1, q2, q3]);
        mem.store_u64(offset + SQE_TAG_OFFSET, word, Ordering::Release)
    }

    #[inline]
    fn published(mem: &SharedMemory, offset: usize, index: u32, _entries: u32) -> Option<u32> {
        let [b0, b1, b2, b3, q0, q1, q2, q3] =
            mem.load_u64(offset + SQE_TAG_OFFSET, Ordering::Acquire).to_ne_bytes();
        (u32::from_ne_bytes([q0, q1, q2, q3]) == Sqe::seq_for(index))
            .then(|| u32::from_ne_bytes([b0, b1, b2, b3]))
    }
}

impl<E: SharedEntry> RingMemory for SharedRing<E> {
    type Entry = E;
    type Tag = E::Tag;

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
    fn write_body(&self, index: u32, entry: E) -> E::Tag {
        entry.write_body(&self.mem, self.offset(index), index, self.entries)
    }
    #[inline]
    fn store_tag(&self, index: u32, tag: E::Tag, batch: u32) {
        E::store_tag(&self.mem, self.offset(index), tag, batch)
    }
    #[inline]
    fn published(&self, index: u32) -> Option<u32> {
        E::published(&self.mem, self.offset(index), index, self.entries)
    }
    #[inline]
    fn read_entry(&self, index: u32) -> E {
        self.mem.read(self.offset(index))
    }
    #[inline]
    fn prefetch_read(&self, index: u32) {
        self.mem.prefetch_read(self.offset(index))
    }
    #[inline]
    fn prefetch_write(&self, index: u32) {
        self.mem.prefetch_write(self.offset(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::SQE_SEQ_OFFSET;

    fn ring_mem(sq: u32, cq: u32) -> (Arc<SharedMemory>, RingLayout) {
        let layout = RingLayout::new(sq, cq).unwrap();
        (Arc::new(SharedMemory::anonymous(layout.total_size).unwrap()), layout)
    }

    #[test]
    fn sqe_body_then_seq() {
        let (mem, layout) = ring_mem(4, 4);
        let ring = submission_ring(mem.clone(), &layout);
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
            reserved1: [0x0a0b, 0x0c0d],
            batch: 0x0e0f, // ignored: the ring writes the hint
            seq: 0xdead,   // and the tag
        };
        let index = 6; // slot 2, second lap
        let tag = ring.write_body(index, sqe);
        assert_eq!(ring.published(index), None, "visible before its tag");
        ring.store_tag(index, tag, 3);
        assert_eq!(ring.published(index), Some(3), "published, with its batch hint");
        assert_eq!(ring.published(index + 4), None, "a lap later is not this entry");
        assert_eq!(ring.published(index - 4), None, "a lap earlier is not this entry");
        let back = ring.read_entry(index);
        assert_eq!(back, Sqe { seq: Sqe::seq_for(index), batch: 3, ..sqe });
        let mut bytes = [0u8; 64];
        mem.copy_out(SQ_ENTRIES_OFFSET + 2 * 64, &mut bytes);
        assert_eq!(&bytes[..], zerocopy::IntoBytes::as_bytes(&back));
    }

    #[test]
    fn cqe_phase_is_set_by_the_ring_and_stripped_on_decode() {
        let (mem, layout) = ring_mem(4, 4);
        let ring = completion_ring(mem, &layout);
        for (index, phase) in [(1u32, CQE_PHASE), (5, 0), (9, CQE_PHASE)] {
            let cqe = Cqe { user_data: 7, status: CQE_PHASE | 0x0200_0005, result: 4096 };
            let tag = ring.write_body(index, cqe);
            assert_eq!(ring.published(index), None);
            ring.store_tag(index, tag, 5);
            assert_eq!(ring.published(index), Some(0), "a CQE has no room for a hint");
            let back = ring.read_entry(index);
            assert_eq!(back.status & CQE_PHASE, phase);
            assert_eq!((back.user_data, back.status_word(), back.result), (7, 0x0200_0005, 4096));
        }
    }

    /// Push, publish, scan, read and consume over many laps, from index 0 and from just
    /// before the u32 wrap (after writing the previous lap, as a ring that got there would).
    #[test]
    fn both_rings_over_many_laps_and_the_wrap() {
        for start in [0u32, u32::MAX - 5] {
            let (mem, layout) = ring_mem(4, 4);
            let mut sq = Producer::new(submission_ring(mem.clone(), &layout), start.wrapping_sub(4));
            let mut cq = Producer::new(completion_ring(mem.clone(), &layout), start.wrapping_sub(4));
            if start != 0 {
                // The previous lap's entries, published and consumed.
                for i in 0..4 {
                    sq.push_unchecked(Sqe::nop(i));
                    cq.push_unchecked(Cqe { user_data: i, ..Cqe::default() });
                }
                sq.publish();
                cq.publish();
                mem.store_u32(SQ_HEAD_OFFSET, start, Ordering::Relaxed);
                mem.store_u32(CQ_HEAD_OFFSET, start, Ordering::Relaxed);
            } else {
                sq = Producer::new(submission_ring(mem.clone(), &layout), 0);
                cq = Producer::new(completion_ring(mem.clone(), &layout), 0);
            }
            let mut sc = Consumer::new(submission_ring(mem.clone(), &layout), start);
            let mut cc = Consumer::new(completion_ring(mem.clone(), &layout), start);
            let mut next = 0u64;
            let mut expect = 0u64;
            for round in 0..40u32 {
                let n = round % 4 + 1;
                assert_eq!(sq.free().unwrap(), 4);
                for _ in 0..n {
                    assert!(sq.push(Sqe::nop(next)).unwrap());
                    assert!(cq.push(Cqe { user_data: next, status: 3, result: 1 }).unwrap());
                    next += 1;
                }
                assert_eq!((sc.ready(16), cc.ready(16)), (0, 0), "nothing before publish");
                sq.publish();
                cq.publish();
                assert_eq!(sc.ready(2), n.min(2), "bounded by max");
                assert_eq!((sc.ready(16), cc.ready(16)), (n, n), "bounded by what was published");
                for i in 0..n {
                    assert_eq!(sc.read(i).user_data, expect + u64::from(i));
                    let c = cc.read(i);
                    assert_eq!((c.user_data, c.status_word(), c.result), (expect + u64::from(i), 3, 1));
                }
                sc.consume(n);
                cc.consume(n);
                expect += u64::from(n);
                assert_eq!((sc.ready(16), cc.ready(16)), (0, 0), "stale lap not taken");
            }
        }
    }

    #[test]
    fn a_wrong_seq_is_not_published() {
        let (mem, layout) = ring_mem(4, 4);
        let mut c = Consumer::new(submission_ring(mem.clone(), &layout), 0);
        for bogus in [0u32, 2, 5, u32::MAX] {
            // (The seq is the upper half of the tag word: a u32 store there is what a client
            // scribbling on it would do.)
            mem.store_u32(SQ_ENTRIES_OFFSET + SQE_SEQ_OFFSET, bogus, Ordering::Relaxed);
            assert_eq!(c.ready(4), 0);
        }
        mem.store_u32(SQ_ENTRIES_OFFSET + SQE_SEQ_OFFSET, 1, Ordering::Relaxed);
        assert_eq!(c.ready(4), 1);
        assert!(c.pop().is_some());
        assert_eq!(c.ready(4), 0);
    }

    /// Memory that records which entries the consumer looked at.
    struct Watched {
        tags: std::cell::RefCell<Vec<(u32, u32)>>,
        looked: std::cell::RefCell<Vec<u32>>,
        prefetched: std::cell::RefCell<Vec<u32>>,
    }

    impl RingMemory for &Watched {
        type Entry = u32;
        type Tag = u32;
        fn entries(&self) -> u32 {
            8
        }
        fn load_head(&self, _: Ordering) -> u32 {
            0
        }
        fn store_head(&self, _: u32, _: Ordering) {}
        fn write_body(&self, index: u32, _: u32) -> u32 {
            index + 1
        }
        fn store_tag(&self, index: u32, tag: u32, batch: u32) {
            self.tags.borrow_mut()[(index % 8) as usize] = (tag, batch);
        }
        fn published(&self, index: u32) -> Option<u32> {
            self.looked.borrow_mut().push(index);
            let (tag, batch) = self.tags.borrow()[(index % 8) as usize];
            (tag == index + 1).then_some(batch)
        }
        fn read_entry(&self, index: u32) -> u32 {
            index
        }
        fn prefetch_read(&self, index: u32) {
            self.prefetched.borrow_mut().push(index);
        }
    }

    /// A batch published together is taken whole, and the slot after it (where the producer
    /// writes next) is never looked at; without a hint the consumer looks until an entry is
    /// not published.
    #[test]
    fn a_batch_is_read_to_its_announced_end_and_no_further() {
        let mem = Watched {
            tags: vec![(0, 0); 8].into(),
            looked: Vec::new().into(),
            prefetched: Vec::new().into(),
        };
        let mut p = Producer::new(&mem, 0);
        let mut c = Consumer::new(&mem, 0);
        for i in 0..3 {
            assert!(p.push(i).unwrap());
        }
        p.publish();
        assert_eq!(mem.tags.borrow()[0], (1, 3), "the first entry carries the batch's size");
        assert_eq!(mem.tags.borrow()[1], (2, 0));
        // "Any work?" first, as the broker asks: the batch's other lines are fetched already.
        assert_eq!(c.ready(1), 1);
        assert_eq!(mem.prefetched.borrow().last(), Some(&2), "the batch's last entry was not prefetched");
        assert_eq!(c.ready(64), 3);
        assert_eq!(*mem.looked.borrow(), [0, 1, 2], "looked past the batch");
        // Partly consumed: the rest of the batch, still no look beyond it.
        c.consume(2);
        assert_eq!(c.ready(64), 1);
        c.consume(1);
        mem.looked.borrow_mut().clear();
        assert_eq!(c.ready(64), 0);
        assert_eq!(*mem.looked.borrow(), [3], "an empty ring costs one look at the next slot");
        // Two batches published before the consumer looks: taken one batch per look.
        p.push(10).unwrap();
        p.publish();
        p.push(11).unwrap();
        p.push(12).unwrap();
        p.publish();
        assert_eq!(c.ready(64), 1);
        c.consume(1);
        assert_eq!(c.ready(64), 2);
        c.consume(2);
        // A hint of 0 (a CQE's, or a hostile one): look until an entry is not published.
        mem.tags.borrow_mut()[6] = (7, 0);
        mem.tags.borrow_mut()[7] = (8, 0);
        mem.looked.borrow_mut().clear();
        assert_eq!(c.ready(64), 2);
        assert_eq!(*mem.looked.borrow(), [6, 7, 8]);
    }

    /// A consumer head ahead of what was published, or a ring behind, is corrupt: the producer
    /// never counts staged entries as consumed, so it never stages more than the ring holds.
    #[test]
    fn a_head_ahead_of_what_was_published_is_corrupt() {
        let (mem, layout) = ring_mem(4, 4);
        let mut cq = Producer::new(completion_ring(mem.clone(), &layout), 0);
        for i in 0..4 {
            assert!(cq.push(Cqe { user_data: i, ..Cqe::default() }).unwrap());
        }
        // Before the publish, a hostile client claims it consumed all four.
        mem.store_u32(CQ_HEAD_OFFSET, 4, Ordering::Relaxed);
        assert!(matches!(cq.free(), Err(RingError::Corrupt { .. })));
        assert!(matches!(cq.push(Cqe::default()), Err(RingError::Corrupt { .. })));
        cq.publish();
        // Published now: the same head is honest, and frees the four slots.
        assert_eq!(cq.free().unwrap(), 4);
        mem.store_u32(CQ_HEAD_OFFSET, 4u32.wrapping_sub(8), Ordering::Relaxed);
        assert!(matches!(cq.free(), Err(RingError::Corrupt { .. })), "a head a ring behind");
        // Hearing of a head beyond the published entries is ignored.
        mem.store_u32(CQ_HEAD_OFFSET, 4, Ordering::Relaxed);
        assert_eq!(cq.free().unwrap(), 4);
        assert!(cq.push(Cqe::default()).unwrap());
        cq.observe_head(5);
        assert_eq!(cq.free_cached(), 3, "an unpublished entry counted as consumed");
    }
}
