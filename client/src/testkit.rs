//! Verified workloads shared by the project's tests (integration tests and the VM test).
//! Enabled by the `testkit` feature; they panic with a description on any mismatch.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::{BufferId, Completion, Io, IoSegment, NvmeRing, Status};

const MIB: u64 = 1 << 20;

/// A deterministic pseudo-random generator (xorshift), so failures replay.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A value below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Fills `buf` with a pattern derived from `seed` (distinct per write).
pub fn pattern(seed: u64, buf: &mut [u8]) {
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    for chunk in buf.chunks_mut(8) {
        let v = r.next_u64().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Runs `ios` with up to `depth` in flight; returns completions by user data.
pub fn run_batch(ring: &mut NvmeRing, ios: &[Io], depth: usize) -> HashMap<u64, Completion> {
    let mut done = HashMap::new();
    let mut next = 0;
    let mut out = Vec::new();
    while done.len() < ios.len() {
        while next < ios.len() && ring.in_flight() < depth {
            ring.prep(ios[next].user_data(next as u64)).unwrap();
            next += 1;
        }
        ring.submit().unwrap();
        out.clear();
        ring.wait(1, &mut out, Some(Duration::from_secs(30))).unwrap();
        for c in out.drain(..) {
            let tag = c.user_data;
            assert!(done.insert(tag, c).is_none(), "request {tag} completed twice");
        }
    }
    done
}

/// Writes random-sized, random-offset extents from several buffers, keeping a model of the
/// namespace region, then reads everything back into other buffers and compares.
pub fn random_write_read(ring: &mut NvmeRing, region: (u64, u64), seed: u64, rounds: usize) {
    let ns = ring.namespaces()[0];
    let lba = u64::from(ns.lba_size);
    let (base, size) = region;
    let mut model = vec![0u8; size as usize];
    let mut written = vec![false; (size / lba) as usize];
    let bufs: Vec<BufferId> = (0..4).map(|_| ring.alloc_buffer(2 * MIB as usize).unwrap()).collect();
    let mut rng = Rng(seed);
    for round in 0..rounds {
        // Disjoint extents per round so in-flight writes never overlap each other.
        let mut ios = Vec::new();
        let mut cursor = 0u64;
        let mut buf_cursor = [0u64; 4];
        while cursor < size && ios.len() < 48 {
            cursor += rng.below(8) * lba;
            // Lengths from one block up to 256 KiB: one page, two pages, and PRP lists.
            let len =
                ((rng.below(512) + 1) * lba).min(size.saturating_sub(cursor)).min(u64::from(ns.max_transfer));
            let b = rng.below(4) as usize;
            if len == 0 || buf_cursor[b] + len + 4096 > 2 * MIB {
                break;
            }
            // Buffer offsets with in-page offsets, 4-byte aligned.
            let boff = buf_cursor[b] + rng.below(1024) * 4;
            buf_cursor[b] = (boff + len).next_multiple_of(4096);
            let data = ring.buffer_mut(bufs[b], boff, len).unwrap();
            pattern(seed ^ (round as u64) << 32 ^ cursor, data);
            model[cursor as usize..(cursor + len) as usize].copy_from_slice(data);
            for blk in cursor / lba..(cursor + len) / lba {
                written[blk as usize] = true;
            }
            ios.push(Io::write(ns.nsid, base + cursor, len as u32, bufs[b], boff));
            cursor += len;
        }
        for (_, c) in run_batch(ring, &ios, 32) {
            assert_eq!(c.status, Status::Success, "write {c:?}");
        }
    }
    // Read back in 128 KiB pieces into a different buffer and compare with the model.
    let rbuf = ring.alloc_buffer(4 * MIB as usize).unwrap();
    let piece = 128 * 1024u64;
    let mut off = 0;
    while off < size {
        let n = piece.min(size - off);
        let ios: Vec<Io> = (0..32)
            .map(|i| off + i * n)
            .take_while(|&o| o < size)
            .map(|o| Io::read(ns.nsid, base + o, n.min(size - o) as u32, rbuf, o - off))
            .collect();
        let count = ios.len() as u64;
        for (_, c) in run_batch(ring, &ios, 32) {
            assert_eq!(c.status, Status::Success, "read {c:?}");
        }
        for i in 0..count {
            let o = off + i * n;
            let len = n.min(size - o);
            let got = ring.buffer(rbuf, o - off, len).unwrap();
            assert!(got == &model[o as usize..(o + len) as usize], "data mismatch at region offset {o}");
        }
        off += count * n;
    }
    assert!(written.iter().filter(|w| **w).count() > written.len() / 4, "the test wrote too little");
}

/// How [`vectored_round_trip`] places a request's segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentLayout {
    /// A layout PRPs can describe: the first segment ends on a page boundary, the others start
    /// on one, every segment but the last is whole pages.
    PageAligned,
    /// 512-byte multiples at 512-byte offsets that are never page aligned (SGLs or bounce).
    Odd512,
    /// Any length (mostly odd) at any byte offset.
    Bytes,
}

/// Vectored requests [`vectored_round_trip`] keeps in flight at once.
pub const VECTORED_DEPTH: usize = 8;
/// Bytes of one segment list slot (256 segments of 24 bytes).
const LIST_SLOT: u64 = 256 * 24;

/// Buffers for [`vectored_round_trip`]: four data buffers the segments live in, segment list
/// slots, and a flat buffer for plain reads.
#[derive(Debug)]
pub struct VectoredBuffers {
    data: Vec<BufferId>,
    data_len: u64,
    lists: BufferId,
    flat: BufferId,
    max_len: u64,
}

impl VectoredBuffers {
    /// Registers buffers for requests of up to `max_len` bytes.
    pub fn new(ring: &mut NvmeRing, max_len: u64) -> crate::Result<Self> {
        // Room for a depth's worth of segments with their gaps, whatever the layout.
        let data_len = (max_len * VECTORED_DEPTH as u64).max(MIB).next_multiple_of(4096);
        let data = (0..4).map(|_| ring.alloc_buffer(data_len as usize)).collect::<crate::Result<_>>()?;
        let lists = ring.alloc_buffer((VECTORED_DEPTH as u64 * LIST_SLOT) as usize)?;
        let flat = ring.alloc_buffer((VECTORED_DEPTH as u64 * max_len) as usize)?;
        Ok(Self { data, data_len, lists, flat, max_len })
    }

    /// Bytes of the namespace [`vectored_round_trip`] uses from its base.
    pub fn region_len(&self) -> u64 {
        VECTORED_DEPTH as u64 * self.stride()
    }

    fn stride(&self) -> u64 {
        self.max_len + 64 * 512
    }
}

/// Places segments of `kind` adding up to `total` bytes in `bufs` (of `buf_len` bytes each),
/// never overlapping what `cursors` (one per buffer) already used.
fn layout(
    rng: &mut Rng,
    kind: SegmentLayout,
    total: u64,
    bufs: &[BufferId],
    buf_len: u64,
    cursors: &mut [u64],
) -> Vec<IoSegment> {
    let mut segs = Vec::new();
    let mut left = total;
    while left > 0 {
        let b = rng.below(bufs.len() as u64) as usize;
        let len = match kind {
            SegmentLayout::PageAligned if segs.is_empty() => (rng.below(8) + 1) * 512,
            SegmentLayout::PageAligned => (rng.below(4) + 1) * 4096,
            SegmentLayout::Odd512 => (rng.below(8) + 1) * 512,
            SegmentLayout::Bytes => rng.below(1500) + 1,
        }
        .min(left);
        // The last segment takes the rest, within the 256-segment limit.
        let len = if segs.len() >= 200 { left } else { len };
        let start = match kind {
            // The first segment ends on a page boundary (if more follow).
            SegmentLayout::PageAligned if segs.is_empty() && len < left => {
                (cursors[b] + rng.below(4) * 4096).next_multiple_of(4096) + 4096 - len
            }
            SegmentLayout::PageAligned => (cursors[b] + rng.below(4) * 4096).next_multiple_of(4096),
            SegmentLayout::Odd512 => {
                let at = (cursors[b] + rng.below(8) * 512).next_multiple_of(512);
                if at.is_multiple_of(4096) {
                    at + 512
                } else {
                    at
                }
            }
            SegmentLayout::Bytes => cursors[b] + rng.below(64),
        };
        assert!(start + len <= buf_len, "data buffers too small for the layout");
        cursors[b] = start + len;
        segs.push(IoSegment::new(bufs[b], start, len as u32));
        left -= len;
    }
    segs
}

fn wait_all(ring: &mut NvmeRing, n: usize, what: &str) {
    ring.submit().unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        ring.wait(n - out.len(), &mut out, Some(Duration::from_secs(30))).unwrap();
    }
    for c in &out {
        assert_eq!(c.status, Status::Success, "{what} {c:?}");
    }
}

/// Rounds of [`VECTORED_DEPTH`] concurrent vectored writes (1 block to `max_len` bytes, with
/// random segment layouts of the given kinds, in turn) over disjoint extents from `base` of the
/// namespace; each extent is then read back with a plain read and with a vectored read into
/// another layout of the same kind, and compared.
pub fn vectored_round_trip(
    ring: &mut NvmeRing,
    bufs: &VectoredBuffers,
    base: u64,
    kinds: &[SegmentLayout],
    seed: u64,
    rounds: usize,
) {
    let ns = ring.namespaces()[0].nsid;
    let mut rng = Rng(seed);
    let blocks = bufs.max_len / 512;
    for round in 0..rounds {
        let kind = kinds[round % kinds.len()];
        let extents: Vec<(u64, u64)> = (0..VECTORED_DEPTH as u64)
            .map(|i| (base + i * bufs.stride() + rng.below(64) * 512, (rng.below(blocks) + 1) * 512))
            .collect();
        let mut cursors = vec![0u64; bufs.data.len()];
        let writes: Vec<Vec<IoSegment>> = extents
            .iter()
            .map(|&(_, len)| layout(&mut rng, kind, len, &bufs.data, bufs.data_len, &mut cursors))
            .collect();
        let mut expect = Vec::new();
        for (i, segs) in writes.iter().enumerate() {
            let mut bytes = vec![0u8; extents[i].1 as usize];
            pattern(seed ^ (round as u64) << 16 ^ i as u64, &mut bytes);
            let mut pos = 0;
            for s in segs {
                let dst = ring.buffer_mut(s.buffer, s.offset, u64::from(s.len)).unwrap();
                dst.copy_from_slice(&bytes[pos..pos + s.len as usize]);
                pos += s.len as usize;
            }
            expect.push(bytes);
        }
        for (i, segs) in writes.iter().enumerate() {
            let list_at = i as u64 * LIST_SLOT;
            ring.prep_writev(ns, extents[i].0, segs, bufs.lists, list_at, i as u64).unwrap();
        }
        wait_all(ring, VECTORED_DEPTH, "vectored write");
        for (i, &(at, len)) in extents.iter().enumerate() {
            let flat_at = i as u64 * bufs.max_len;
            ring.read(ns, at, bufs.flat, flat_at, len as u32).unwrap();
            let got = ring.buffer(bufs.flat, flat_at, len).unwrap();
            assert!(got == &expect[i][..], "{kind:?} round {round}: extent {i} ({len} bytes) differs");
        }
        let mut cursors = vec![0u64; bufs.data.len()];
        let reads: Vec<Vec<IoSegment>> = extents
            .iter()
            .map(|&(_, len)| layout(&mut rng, kind, len, &bufs.data, bufs.data_len, &mut cursors))
            .collect();
        for s in reads.iter().flatten() {
            ring.buffer_mut(s.buffer, s.offset, u64::from(s.len)).unwrap().fill(0xee);
        }
        for (i, segs) in reads.iter().enumerate() {
            let list_at = i as u64 * LIST_SLOT;
            ring.prep_readv(ns, extents[i].0, segs, bufs.lists, list_at, i as u64).unwrap();
        }
        wait_all(ring, VECTORED_DEPTH, "vectored read");
        for (i, segs) in reads.iter().enumerate() {
            let mut pos = 0;
            for (k, s) in segs.iter().enumerate() {
                let got = ring.buffer(s.buffer, s.offset, u64::from(s.len)).unwrap();
                assert!(
                    got == &expect[i][pos..pos + s.len as usize],
                    "{kind:?} round {round}: extent {i} segment {k} of {} ({s:?}) differs",
                    segs.len()
                );
                pos += s.len as usize;
            }
        }
    }
}

/// 4 KiB reads at depth `qd` on `ring` for `secs` (over the first 32 MiB of its first
/// namespace); returns how many completed. See [`io_for`].
pub fn reads_for(ring: &mut NvmeRing, qd: u64, secs: f64) -> u64 {
    io_for(ring, qd, secs, 4096, false)
}

/// Requests of `size` bytes (reads, or writes) at depth `qd` on `ring` for `secs`, over the
/// first 32 MiB of the ring's first namespace; returns how many completed (each must succeed).
/// What is still in flight at the end is drained (not counted) and the buffer unregistered.
pub fn io_for(ring: &mut NvmeRing, qd: u64, secs: f64, size: u64, write: bool) -> u64 {
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer((qd * size) as usize).unwrap();
    let blocks = (32 * MIB) / size;
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let (mut out, mut done, mut next) = (Vec::new(), 0u64, 0u64);
    let mut free: Vec<u64> = (0..qd).collect();
    while Instant::now() < end {
        while let Some(slot) = free.pop() {
            let (offset, at) = ((next % blocks) * size, slot * size);
            let io = if write {
                Io::write(ns, offset, size as u32, buf, at)
            } else {
                Io::read(ns, offset, size as u32, buf, at)
            };
            ring.prep(io.user_data(slot)).unwrap();
            next += 1;
        }
        ring.submit().unwrap();
        out.clear();
        ring.wait(1, &mut out, Some(Duration::from_secs(5))).unwrap();
        for c in &out {
            assert!(c.status.is_success(), "{c:?}");
            free.push(c.user_data);
        }
        done += out.len() as u64;
    }
    while ring.in_flight() > 0 {
        out.clear();
        ring.wait(1, &mut out, Some(Duration::from_secs(5))).unwrap();
    }
    ring.unregister_buffer(buf).unwrap();
    done
}
