//! The workload definition shared by every engine: what to issue next, and block verification.

use clap::ValueEnum;

/// Access pattern (fio's `--rw`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Random mix of reads and writes (`--rwmixread` percent reads).
    Randrw,
}

/// One I/O to issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextIo {
    /// Write (else read).
    pub write: bool,
    /// Byte offset on the target.
    pub offset: u64,
}

/// Generates offsets and directions for one job.
#[derive(Debug, Clone)]
pub struct Workload {
    rw: Rw,
    rwmixread: u32,
    bs: u64,
    start: u64,
    blocks: u64,
    cursor: u64,
    rng: u64,
}

impl Workload {
    /// A workload over `size` bytes starting at `offset`, in `bs` blocks.
    pub fn new(rw: Rw, rwmixread: u32, bs: u64, offset: u64, size: u64, seed: u64) -> Self {
        Self { rw, rwmixread, bs, start: offset, blocks: (size / bs).max(1), cursor: 0, rng: seed | 1 }
    }

    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// A random number below `n` (multiply and shift: no division per I/O).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.rand()) * u128::from(n)) >> 64) as u64
    }

    /// Blocks in the range.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Index of the block at `offset` within the range.
    pub fn block_index(&self, offset: u64) -> usize {
        ((offset - self.start) / self.bs) as usize
    }

    /// The next I/O.
    pub fn next_io(&mut self) -> NextIo {
        let (write, random) = match self.rw {
            Rw::Read => (false, false),
            Rw::Write => (true, false),
            Rw::Randread => (false, true),
            Rw::Randwrite => (true, true),
            Rw::Randrw => (self.below(100) >= u64::from(self.rwmixread), true),
        };
        let block = if random {
            self.below(self.blocks)
        } else {
            let b = self.cursor;
            self.cursor = if self.cursor + 1 == self.blocks { 0 } else { self.cursor + 1 };
            b
        };
        NextIo { write, offset: self.start + block * self.bs }
    }
}

const HEADER: usize = 24;

fn checksum(data: &[u8]) -> u64 {
    // FNV-1a over 8-byte words: cheap, and any flipped or misplaced word changes it.
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for w in data.chunks_exact(8) {
        h ^= u64::from_le_bytes(w.try_into().unwrap());
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Fills one verify block: offset, seed and a checksum of the payload, then the payload.
pub fn fill_block(block: &mut [u8], offset: u64, seed: u64) {
    block[0..8].copy_from_slice(&offset.to_le_bytes());
    block[8..16].copy_from_slice(&seed.to_le_bytes());
    let mut x = seed ^ offset.rotate_left(17) | 1;
    for w in block[HEADER..].chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    let c = checksum(&block[HEADER..]);
    block[16..24].copy_from_slice(&c.to_le_bytes());
}

/// Checks a block read back: it must be a valid block written for `offset`.
pub fn check_block(block: &[u8], offset: u64) -> Result<(), String> {
    let stored_off = u64::from_le_bytes(block[0..8].try_into().unwrap());
    if stored_off != offset {
        return Err(format!("block at {offset:#x} holds data written for {stored_off:#x}"));
    }
    let want = u64::from_le_bytes(block[16..24].try_into().unwrap());
    if checksum(&block[HEADER..]) != want {
        return Err(format!("block at {offset:#x}: checksum mismatch"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_catches_corruption() {
        let mut b = vec![0u8; 4096];
        assert!(check_block(&b, 0).is_err(), "a block never written does not pass");
        fill_block(&mut b, 8192, 5);
        assert!(check_block(&b, 8192).is_ok());
        assert!(check_block(&b, 4096).is_err());
        b[1000] ^= 1;
        assert!(check_block(&b, 8192).is_err());
    }

    #[test]
    fn offsets_stay_in_range() {
        let mut w = Workload::new(Rw::Randrw, 70, 4096, 1 << 20, 1 << 20, 1);
        let mut reads = 0;
        for _ in 0..10000 {
            let io = w.next_io();
            assert!(io.offset >= 1 << 20 && io.offset + 4096 <= 2 << 20 && io.offset.is_multiple_of(4096));
            reads += u32::from(!io.write);
        }
        assert!((6500..7500).contains(&reads), "{reads}");
    }
}
