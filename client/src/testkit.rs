//! Verified workloads shared by the project's tests (integration tests and the VM test).
//! Enabled by the `testkit` feature; they panic with a description on any mismatch.

use std::collections::HashMap;
use std::time::Duration;

use crate::{BufferId, Completion, Io, NvmeRing, Status};

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
            done.insert(c.user_data, c);
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
