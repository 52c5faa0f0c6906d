//! PRP (physical region page) construction for a contiguous IOVA range.

use nvmed_proto::shm::SharedMemory;

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
}
