//! Device commands whose data is a list of segments (vectored requests): cutting a request
//! into device-sized pieces, and choosing how each piece's data is described.
//!
//! A piece goes to the device with **PRPs** when its layout allows it ([`prp::segments_fit`]),
//! else with **SGLs** when the controller supports them and their alignment rules hold
//! ([`sgl_fits`]), else it must be **bounced** through broker memory (which is one contiguous,
//! page-aligned range, so always PRP-able).

use nvmed_proto::shm::SharedMemory;

use crate::nvme::prp;
use crate::nvme::spec::sgl;

/// Most SGL data block descriptors one command carries: one list page of 16-byte descriptors.
pub const MAX_SGL_DESCRIPTORS: usize = (prp::PAGE / sgl::DESCRIPTOR_SIZE) as usize;

/// A run of device-visible memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DmaSeg {
    /// Where the device finds it.
    pub iova: u64,
    /// Bytes (at least one).
    pub len: u32,
    /// Which mapping it lies in (a buffer id): neighbours are merged only within one mapping.
    pub tag: u32,
}

/// What the controller's Identify SGLS field says about SGL support.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SglSupport {
    /// No SGLs for I/O commands: PRPs only.
    #[default]
    None,
    /// SGLs with data blocks of any address and length.
    Byte,
    /// SGLs whose data blocks are dword aligned in address and length.
    Dword,
}

impl SglSupport {
    /// Decodes Identify Controller SGLS (bytes 536..540), bits 1:0.
    pub fn from_sgls(sgls: u32) -> Self {
        match sgls & 3 {
            1 => SglSupport::Byte,
            2 => SglSupport::Dword,
            _ => SglSupport::None,
        }
    }
}

/// How a piece's data reaches the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    /// PRP1/PRP2 and a PRP list.
    Prp,
    /// SGL data block descriptors.
    Sgl,
    /// Neither fits: copy through a broker-owned bounce buffer.
    Bounce,
}

/// A position in a segment list: segment index and byte offset inside that segment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Segment index.
    pub seg: u16,
    /// Bytes of that segment already behind the cursor.
    pub offset: u32,
}

/// Calls `f(segment, offset in it, bytes)` for the `len` bytes of `segs` that start at `at`;
/// returns the cursor after them. `segs` must hold at least that many bytes after `at`.
pub fn walk(segs: &[DmaSeg], at: Cursor, len: u32, mut f: impl FnMut(&DmaSeg, u32, u32)) -> Cursor {
    let mut cur = at;
    let mut left = len;
    while left > 0 {
        let s = &segs[usize::from(cur.seg)];
        let n = (s.len - cur.offset).min(left);
        f(s, cur.offset, n);
        left -= n;
        cur.offset += n;
        if cur.offset == s.len {
            cur = Cursor { seg: cur.seg + 1, offset: 0 };
        }
    }
    cur
}

/// Collects the `len` bytes of `segs` starting at `at` into `out` as device runs, merging
/// neighbours that are contiguous in IOVA and in the same mapping. Returns how many runs, or
/// `None` if they do not fit in `out`.
pub fn gather(segs: &[DmaSeg], at: Cursor, len: u32, out: &mut [DmaSeg]) -> Option<usize> {
    let mut n = 0usize;
    let mut overflow = false;
    walk(segs, at, len, |s, off, bytes| {
        let iova = s.iova + u64::from(off);
        if n > 0 {
            let last = &mut out[n - 1];
            if last.tag == s.tag && last.iova + u64::from(last.len) == iova {
                last.len += bytes;
                return;
            }
        }
        match out.get_mut(n) {
            Some(slot) => {
                *slot = DmaSeg { iova, len: bytes, tag: s.tag };
                n += 1;
            }
            None => overflow = true,
        }
    });
    (!overflow).then_some(n)
}

/// Whether SGLs (as supported) can describe `segs` in one list page.
///
/// Data blocks must be dword aligned in address and length on every controller, also one that
/// claims byte-granular SGLs: Linux never sends it anything else (its NVMe queues have a
/// dword DMA alignment), so firmware has rarely met odd-byte descriptors, and a firmware bug
/// there (a hang, a reset for every tenant, data moved wrongly) is not worth what bouncing
/// those few requests through a broker page costs.
pub fn sgl_fits(segs: &[DmaSeg], support: SglSupport) -> bool {
    let aligned = |s: &DmaSeg| s.iova.is_multiple_of(4) && s.len.is_multiple_of(4);
    !segs.is_empty()
        && segs.len() <= MAX_SGL_DESCRIPTORS
        && match support {
            SglSupport::None => false,
            SglSupport::Byte | SglSupport::Dword => segs.iter().all(aligned),
        }
}

/// PRPs if they fit, else SGLs if they fit, else a bounce buffer.
pub fn choose(segs: &[DmaSeg], support: SglSupport) -> Transfer {
    if prp::segments_fit(segs) {
        Transfer::Prp
    } else if sgl_fits(segs, support) {
        Transfer::Sgl
    } else {
        Transfer::Bounce
    }
}

/// Builds the SGL of `segs` (a layout [`sgl_fits`] accepts): one data block descriptor goes
/// into SGL1 itself; more are written as a list into `list` (one page at `list_iova`) that a
/// Last Segment descriptor in SGL1 points at. Returns SGL1 as the command's (PRP1, PRP2) words.
pub fn build_sgl(segs: &[DmaSeg], list: &SharedMemory, list_offset: usize, list_iova: u64) -> (u64, u64) {
    debug_assert!(!segs.is_empty() && segs.len() <= MAX_SGL_DESCRIPTORS);
    if let [only] = segs {
        return sgl::descriptor(only.iova, only.len, sgl::DATA_BLOCK);
    }
    for (i, s) in segs.iter().enumerate() {
        let (address, rest) = sgl::descriptor(s.iova, s.len, sgl::DATA_BLOCK);
        list.write::<u64>(list_offset + i * 16, address);
        list.write::<u64>(list_offset + i * 16 + 8, rest);
    }
    let bytes = (segs.len() as u64 * sgl::DESCRIPTOR_SIZE) as u32;
    sgl::descriptor(list_iova, bytes, sgl::LAST_SEGMENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(iova: u64, len: u32) -> DmaSeg {
        DmaSeg { iova, len, tag: 0 }
    }

    #[test]
    fn sgls_decode() {
        assert_eq!(SglSupport::from_sgls(0), SglSupport::None);
        assert_eq!(SglSupport::from_sgls(0x0010_0001), SglSupport::Byte);
        assert_eq!(SglSupport::from_sgls(2), SglSupport::Dword);
        assert_eq!(SglSupport::from_sgls(3), SglSupport::None);
    }

    #[test]
    fn layouts_choose_prp_sgl_or_bounce() {
        use Transfer::*;
        let page_aligned = [seg(0x10000, 0x1000), seg(0x30000, 0x2000), seg(0x50000, 0x200)];
        let odd_512 = [seg(0x10200, 0x200), seg(0x30400, 0x600), seg(0x50a00, 0x200)];
        let bytes = [seg(0x10001, 3), seg(0x30005, 509)];
        let dwords = [seg(0x10004, 0x1fc), seg(0x30008, 4)];
        for support in [SglSupport::None, SglSupport::Byte, SglSupport::Dword] {
            // PRPs whenever they fit, whatever the controller's SGL support.
            assert_eq!(choose(&page_aligned, support), Prp);
            assert_eq!(choose(&[seg(0x10204, 0x10000)], support), Prp);
        }
        assert_eq!(choose(&odd_512, SglSupport::Byte), Sgl);
        assert_eq!(choose(&odd_512, SglSupport::Dword), Sgl);
        assert_eq!(choose(&odd_512, SglSupport::None), Bounce);
        assert_eq!(choose(&bytes, SglSupport::Byte), Bounce, "odd bytes are never sent as SGLs");
        assert_eq!(choose(&bytes, SglSupport::Dword), Bounce, "dword SGLs cannot take odd bytes");
        assert_eq!(choose(&dwords, SglSupport::Byte), Sgl);
        assert_eq!(choose(&bytes, SglSupport::None), Bounce);
        assert_eq!(choose(&dwords, SglSupport::Dword), Sgl);
        // More runs than one SGL list page holds (and PRPs impossible): bounce.
        let many: Vec<DmaSeg> = (0..257).map(|i| seg(0x100000 + i * 0x2000 + 0x200, 0x200)).collect();
        assert_eq!(choose(&many[..256], SglSupport::Byte), Sgl);
        assert_eq!(choose(&many, SglSupport::Byte), Bounce);
    }

    #[test]
    fn gather_cuts_pieces_and_merges_neighbours() {
        let segs = [
            DmaSeg { iova: 0x10000, len: 0x600, tag: 1 },
            DmaSeg { iova: 0x10600, len: 0xa00, tag: 1 }, // continues the first: merged
            DmaSeg { iova: 0x11000, len: 0x1000, tag: 2 }, // contiguous but another mapping
            DmaSeg { iova: 0x40000, len: 0x800, tag: 2 },
        ];
        let mut out = [DmaSeg::default(); 8];
        // The whole list.
        assert_eq!(gather(&segs, Cursor::default(), 0x2800, &mut out), Some(2 + 1));
        assert_eq!(out[0], DmaSeg { iova: 0x10000, len: 0x1000, tag: 1 });
        assert_eq!(out[1], DmaSeg { iova: 0x11000, len: 0x1000, tag: 2 });
        // A piece starting inside the second segment and ending inside the fourth.
        let at = Cursor { seg: 1, offset: 0x200 };
        assert_eq!(gather(&segs, at, 0x1a00, &mut out), Some(3));
        assert_eq!(
            &out[..3],
            &[
                DmaSeg { iova: 0x10800, len: 0x800, tag: 1 },
                DmaSeg { iova: 0x11000, len: 0x1000, tag: 2 },
                DmaSeg { iova: 0x40000, len: 0x200, tag: 2 },
            ]
        );
        assert_eq!(walk(&segs, at, 0x1a00, |_, _, _| {}), Cursor { seg: 3, offset: 0x200 });
        assert_eq!(walk(&segs, Cursor::default(), 0x1000, |_, _, _| {}), Cursor { seg: 2, offset: 0 });
        // Not enough room for the runs.
        assert_eq!(gather(&segs, Cursor::default(), 0x2800, &mut out[..2]), None);
    }

    #[test]
    fn sgl_descriptors() {
        let list = SharedMemory::anonymous(4096).unwrap();
        // One run: a data block descriptor in SGL1.
        let (a, b) = build_sgl(&[seg(0x10203, 77)], &list, 0, 0x9000);
        assert_eq!(sgl::parse((a, b)), (0x10203, 77, sgl::DATA_BLOCK, 0));
        // Several: SGL1 is a Last Segment descriptor pointing at the data blocks.
        let segs = [seg(0x10200, 0x200), seg(0x30401, 0x5ff), seg(0x50a00, 0x1000)];
        let (a, b) = build_sgl(&segs, &list, 4096 - 48, 0x9fd0);
        assert_eq!(sgl::parse((a, b)), (0x9fd0, 48, sgl::LAST_SEGMENT, 0));
        for (i, s) in segs.iter().enumerate() {
            let words = (list.read::<u64>(4096 - 48 + i * 16), list.read::<u64>(4096 - 40 + i * 16));
            assert_eq!(sgl::parse(words), (s.iova, s.len, sgl::DATA_BLOCK, 0));
        }
    }
}
