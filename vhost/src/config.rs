//! virtio-blk device features and configuration space, derived from the nvmed namespace.

use nvmed_client::{NamespaceInfo, MAX_SEGMENTS};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// virtio-blk sector size: capacities and request offsets are in these units.
pub const SECTOR: u64 = 512;
/// Segments of an nvmed vectored request kept back from `seg_max` for descriptors split where
/// they cross a guest RAM region boundary.
pub const REGION_SPLIT_RESERVE: u32 = 2;
/// Largest number of data segments per request we advertise (`seg_max`), when the namespace's
/// transfer limit allows it: a read or write becomes one nvmed request of at most
/// [`MAX_SEGMENTS`] segments (the guest uses indirect descriptors for long chains).
pub const SEG_MAX: u32 = MAX_SEGMENTS as u32 - REGION_SPLIT_RESERVE;
/// Discard / write-zeroes segments accepted in one request.
pub const MAX_DISCARD_SEGS: u32 = 8;
/// Largest discard of one segment in bytes (larger ones are split anyway).
pub const MAX_DISCARD_BYTES: u64 = 1 << 30;
/// nvmed's Write Zeroes limit in LBAs (NVMe NLB is 16 bits).
pub const MAX_WRITE_ZEROES_LBAS: u64 = 1 << 16;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Size of the configuration space we serve (up to and including `unused1`).
pub const CONFIG_SIZE: usize = 60;

/// What the device looks like to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskGeometry {
    /// nvmed namespace id.
    pub nsid: u32,
    /// LBA size in bytes (512 or 4096): the guest's logical block size.
    pub lba_size: u32,
    /// Capacity in bytes.
    pub size: u64,
    /// Largest data segment in bytes (`size_max`).
    pub size_max: u32,
    /// Largest number of data segments (`seg_max`).
    pub seg_max: u32,
    /// Largest request in bytes we accept (`seg_max * size_max`, never above nvmed's limit).
    pub max_request: u32,
    /// Read-only device.
    pub read_only: bool,
    /// Number of virtqueues.
    pub num_queues: u16,
}

impl DiskGeometry {
    /// Derives the device from the namespace nvmed granted. `seg_max * size_max` never exceeds
    /// the namespace's `max_transfer` (the largest request nvmed accepts; it splits at the
    /// controller's MDTS itself), so one virtio request always fits one nvmed request.
    pub fn new(ns: &NamespaceInfo, num_queues: u16, read_only: bool) -> Self {
        let max_transfer = ns.max_transfer.max(4096);
        let seg_max = SEG_MAX.min(max_transfer / 4096).max(1);
        let size_max = (max_transfer / seg_max / 4096 * 4096).max(4096);
        Self {
            nsid: ns.nsid,
            lba_size: ns.lba_size,
            size: ns.size_bytes(),
            size_max,
            seg_max,
            max_request: seg_max * size_max,
            read_only: read_only || ns.read_only,
            num_queues,
        }
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.size / SECTOR
    }

    /// Largest discard in 512-byte sectors, a multiple of the LBA size.
    pub fn max_discard_sectors(&self) -> u32 {
        (MAX_DISCARD_BYTES / u64::from(self.lba_size) * u64::from(self.lba_size) / SECTOR) as u32
    }

    /// Largest write-zeroes in 512-byte sectors.
    pub fn max_write_zeroes_sectors(&self) -> u32 {
        (MAX_WRITE_ZEROES_LBAS * u64::from(self.lba_size) / SECTOR).min(u64::from(u32::MAX)) as u32
    }

    /// virtio feature bits offered to the driver (without vhost-user's PROTOCOL_FEATURES bit).
    pub fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_CONFIG_WCE)
            | (1 << VIRTIO_BLK_F_MQ);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    /// The configuration space (`struct virtio_blk_config`, little endian) with the given
    /// write-cache setting (1 = write back, 0 = write through).
    pub fn config_space(&self, wce: u8) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        let put32 =
            |c: &mut [u8; CONFIG_SIZE], off: usize, v: u32| c[off..off + 4].copy_from_slice(&v.to_le_bytes());
        c[0..8].copy_from_slice(&self.capacity_sectors().to_le_bytes());
        put32(&mut c, 8, self.size_max);
        put32(&mut c, 12, self.seg_max);
        // geometry (16..20) stays zero: no CHS.
        put32(&mut c, 20, self.lba_size);
        // physical_block_exp, alignment_offset, min_io_size, opt_io_size: topology not offered.
        c[32] = wce;
        c[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        let lba_sectors = self.lba_size / SECTOR as u32;
        put32(&mut c, 36, self.max_discard_sectors());
        put32(&mut c, 40, MAX_DISCARD_SEGS);
        put32(&mut c, 44, lba_sectors);
        put32(&mut c, 48, self.max_write_zeroes_sectors());
        put32(&mut c, 52, MAX_DISCARD_SEGS);
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// The GET_ID answer: a serial naming the namespace, NUL padded.
    pub fn serial(&self) -> [u8; ID_BYTES] {
        let mut id = [0u8; ID_BYTES];
        let s = format!("nvmed-ns{}", self.nsid);
        let n = s.len().min(ID_BYTES);
        id[..n].copy_from_slice(&s.as_bytes()[..n]);
        id
    }
}

#[cfg(test)]
mod tests {
    use std::mem::offset_of;

    use virtio_bindings::virtio_blk::virtio_blk_config as C;

    use super::*;

    fn ns(lba_size: u32, lba_count: u64, max_transfer: u32, read_only: bool) -> NamespaceInfo {
        NamespaceInfo {
            nsid: 3,
            lba_size,
            lba_count,
            max_transfer,
            read_only,
            controller: 0,
            controller_nsid: 3,
            volatile_write_cache: true,
            state: nvmed_client::ControllerState::Running,
        }
    }

    fn le32(c: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(c[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn config_space_fields_at_the_spec_offsets() {
        let g = DiskGeometry::new(&ns(4096, 1000, 16 << 20, false), 4, false);
        let c = g.config_space(1);
        assert_eq!(u64::from_le_bytes(c[offset_of!(C, capacity)..][..8].try_into().unwrap()), 1000 * 8);
        assert_eq!(le32(&c, offset_of!(C, size_max)), g.size_max);
        assert_eq!(le32(&c, offset_of!(C, seg_max)), SEG_MAX);
        assert_eq!(le32(&c, offset_of!(C, blk_size)), 4096);
        assert_eq!(c[offset_of!(C, wce)], 1);
        assert_eq!(u16::from_le_bytes(c[offset_of!(C, num_queues)..][..2].try_into().unwrap()), 4);
        assert_eq!(le32(&c, offset_of!(C, max_discard_sectors)), (1 << 30) / 512);
        assert_eq!(le32(&c, offset_of!(C, max_discard_seg)), MAX_DISCARD_SEGS);
        assert_eq!(le32(&c, offset_of!(C, discard_sector_alignment)), 8);
        assert_eq!(le32(&c, offset_of!(C, max_write_zeroes_sectors)), 65536 * 8);
        assert_eq!(le32(&c, offset_of!(C, max_write_zeroes_seg)), MAX_DISCARD_SEGS);
        assert_eq!(c[offset_of!(C, write_zeroes_may_unmap)], 1);
        assert_eq!(offset_of!(C, unused1) + 3, CONFIG_SIZE);
    }

    #[test]
    fn segments_times_size_fit_one_nvmed_request() {
        for mt in [4096u32, 8192, 128 << 10, 512 << 10, 1 << 20, 16 << 20, (16 << 20) - 4096] {
            let g = DiskGeometry::new(&ns(512, 1 << 20, mt, false), 1, false);
            assert!(u64::from(g.seg_max) * u64::from(g.size_max) <= u64::from(mt), "{mt}: {g:?}");
            assert_eq!(g.max_request, g.seg_max * g.size_max);
            assert_eq!(g.size_max % 4096, 0);
            assert!(g.seg_max >= 1 && g.seg_max <= SEG_MAX);
        }
        let g = DiskGeometry::new(&ns(512, 1 << 20, 16 << 20, false), 1, false);
        assert_eq!((g.seg_max, g.size_max), (254, 64 << 10));
        assert!(g.seg_max + REGION_SPLIT_RESERVE <= u32::from(MAX_SEGMENTS));
    }

    #[test]
    fn read_only_grant_or_flag_sets_ro_and_drops_discard() {
        let rw = DiskGeometry::new(&ns(512, 2048, 1 << 20, false), 1, false);
        assert_eq!(rw.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(rw.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
        for g in [
            DiskGeometry::new(&ns(512, 2048, 1 << 20, true), 1, false),
            DiskGeometry::new(&ns(512, 2048, 1 << 20, false), 1, true),
        ] {
            assert_ne!(g.features() & (1 << VIRTIO_BLK_F_RO), 0);
            assert_eq!(g.features() & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        }
        assert_eq!(rw.capacity_sectors(), 2048);
        assert_eq!(&rw.serial()[..9], b"nvmed-ns3");
    }
}
