//! PRP (physical region page) construction for a contiguous IOVA range, and for a list of
//! segments whose layout PRPs can describe.

use nvmed_proto::shm::SharedMemory;

use crate::nvme::vector::DmaSeg;

/// Controller memory page size the driver configures (CC.MPS = 0).
pub const PAGE: u64 = 4096;
/// PRP entries in one list page.
pub const ENTRIES_PER_LIST: u64 = PAGE / 8;
/// Largest transfer one PRP list page can describe.
pub const MAX_TRANSFER_ONE_LIST: u64 = ENTRIES_PER_LIST * PAGE;

/// Fills in PRP1/PRP2 for `len` bytes at `iova` (4-byte aligned), writing a PRP list into
/// `list` (one page at `list_iova`) when the range spans more than two pages.
/// `len` must be at most [`MAX_TRANSFER_ONE_LIST`].
pub fn build(iova: u64, len: u64, list: &SharedMemory, list_offset: usize, list_iova: u64) -> (u64, u64) {
    debug_assert!(len > 0 && len <= MAX_TRANSFER_ONE_LIST && iova.is_multiple_of(4));
    let first = PAGE - (iova % PAGE);
    if len <= first {
        return (iova, 0);
    }
    let second_page = iova - (iova % PAGE) + PAGE;
    let rest = len - first;
    if rest <= PAGE {
        return (iova, second_page);
    }
    let pages = rest.div_ceil(PAGE);
    for i in 0..pages {
        list.write::<u64>(list_offset + (i as usize) * 8, second_page + i * PAGE);
    }
    (iova, list_iova)
}

/// Whether PRPs can describe `segs` in one list page: the first segment starts 4-byte
/// aligned, every other segment starts on a page boundary, every segment but the last ends on
/// one, and the transfer touches at most `1 + ENTRIES_PER_LIST` pages.
pub fn segments_fit(segs: &[DmaSeg]) -> bool {
    let Some(first) = segs.first() else { return false };
    if !first.iova.is_multiple_of(4) {
        return false;
    }
    let last = segs.len() - 1;
    let mut pages = 0u64;
    for (i, s) in segs.iter().enumerate() {
        if s.len == 0 || (i > 0 && !s.iova.is_multiple_of(PAGE)) {
            return false;
        }
        let Some(end) = s.iova.checked_add(u64::from(s.len)) else { return false };
        if i < last && !end.is_multiple_of(PAGE) {
            return false;
        }
        pages += end.div_ceil(PAGE) - s.iova / PAGE;
    }
    pages <= 1 + ENTRIES_PER_LIST
}

/// Fills in PRP1/PRP2 for `segs` (a layout [`segments_fit`] accepts), writing a PRP list into
/// `list` (one page at `list_iova`) when the transfer touches more than two pages.
pub fn build_segments(
    segs: &[DmaSeg],
    list: &SharedMemory,
    list_offset: usize,
    list_iova: u64,
) -> (u64, u64) {
    debug_assert!(segments_fit(segs));
    let prp1 = segs[0].iova;
    // Every page after the first one the transfer touches, in order.
    let mut pages = segs.iter().enumerate().flat_map(|(i, s)| {
        let first_page = if i == 0 { s.iova / PAGE + 1 } else { s.iova / PAGE };
        let end_page = (s.iova + u64::from(s.len)).div_ceil(PAGE);
        (first_page..end_page).map(|p| p * PAGE)
    });
    let Some(second) = pages.next() else { return (prp1, 0) };
    let Some(third) = pages.next() else { return (prp1, second) };
    list.write::<u64>(list_offset, second);
    list.write::<u64>(list_offset + 8, third);
    for (i, page) in pages.enumerate() {
        list.write::<u64>(list_offset + (i + 2) * 8, page);
    }
    (prp1, list_iova)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prp_shapes() {
        let list = SharedMemory::anonymous(4096).unwrap();
        assert_eq!(build(0x10000, 4096, &list, 0, 0x9000), (0x10000, 0));
        assert_eq!(build(0x10200, 512, &list, 0, 0x9000), (0x10200, 0));
        assert_eq!(build(0x10200, 4096, &list, 0, 0x9000), (0x10200, 0x11000));
        assert_eq!(build(0x10000, 8192, &list, 0, 0x9000), (0x10000, 0x11000));
        assert_eq!(build(0x10000, 3 * 4096, &list, 0, 0x9000), (0x10000, 0x9000));
        assert_eq!(list.read::<u64>(0), 0x11000);
        assert_eq!(list.read::<u64>(8), 0x12000);
        let (_, p2) = build(0x10004, MAX_TRANSFER_ONE_LIST, &list, 0, 0x9000);
        assert_eq!(p2, 0x9000);
        assert_eq!(list.read::<u64>(511 * 8), 0x10000 + 512 * 4096);
    }

    fn seg(iova: u64, len: u32) -> DmaSeg {
        DmaSeg { iova, len, tag: 0 }
    }

    #[test]
    fn prps_from_segments() {
        let list = SharedMemory::anonymous(4096).unwrap();
        // One segment: as for a contiguous range.
        assert!(segments_fit(&[seg(0x10200, 512)]));
        assert_eq!(build_segments(&[seg(0x10200, 512)], &list, 0, 0x9000), (0x10200, 0));
        // Two segments, the first ending on a page boundary: PRP1 + PRP2.
        let two = [seg(0x10e00, 0x200), seg(0x40000, 0x800)];
        assert!(segments_fit(&two));
        assert_eq!(build_segments(&two, &list, 0, 0x9000), (0x10e00, 0x40000));
        // Scattered pages: a list with every page after the first.
        let many = [seg(0x10004, 0x0ffc), seg(0x80000, 0x2000), seg(0x20000, 0x1000), seg(0x50000, 0x10)];
        assert!(segments_fit(&many));
        assert_eq!(build_segments(&many, &list, 8, 0x9000), (0x10004, 0x9000));
        let entries: Vec<u64> = (0..4).map(|i| list.read::<u64>(8 + i * 8)).collect();
        assert_eq!(entries, [0x80000, 0x81000, 0x20000, 0x50000]);
        // A first segment spanning pages: its own later pages come first.
        let spanning = [seg(0x10800, 0x1800), seg(0x30000, 0x1000)];
        assert_eq!(build_segments(&spanning, &list, 0, 0x9000), (0x10800, 0x9000));
        assert_eq!((list.read::<u64>(0), list.read::<u64>(8)), (0x11000, 0x30000));
    }

    #[test]
    fn layouts_prps_cannot_describe() {
        // A middle segment that does not start or end on a page boundary.
        assert!(!segments_fit(&[seg(0x10000, 0x1000), seg(0x20200, 0x200)]));
        assert!(!segments_fit(&[seg(0x10000, 0x800), seg(0x20000, 0x1000)]));
        // A first segment that is not dword aligned.
        assert!(!segments_fit(&[seg(0x10001, 0x10)]));
        // More pages than one list page holds (first page + 512 entries).
        let big: Vec<DmaSeg> = (0..514).map(|i| seg(0x100000 + i * 0x2000, 0x1000)).collect();
        assert!(segments_fit(&big[..513]));
        assert!(!segments_fit(&big));
        assert!(!segments_fit(&[]));
    }
}
