//! Guest RAM as nvmed buffers: which guest physical address lives in which registered buffer.
//!
//! QEMU hands over each RAM region as (fd, mmap offset, size, guest physical address). The
//! VM's nvmed session registers every region once ([`SharedRegions`]), as a shared buffer
//! covering exactly that range of the memfd that every queue's ring uses, so a guest address
//! translates to (buffer id, offset in the buffer) and the device DMAs straight into guest RAM
//! (pinned once with VFIO, however many queues).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use nvmed_client::{BufferId, MemfdBuffer, NvmeSession, SharedBuffer};

use crate::error::RegionError;

/// The QEMU options that give guest RAM nvmed can register.
pub const MEMFD_HINT: &str =
    "start QEMU with `-object memory-backend-memfd,id=mem,size=...,share=on -machine memory-backend=mem` \
     (seal=on, the default, seals it against shrinking as nvmed requires)";

/// A guest RAM region as QEMU described it; the file is identified by device and inode so the
/// same memfd sent again in a later memory table is recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegionSpec {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of the region in its file.
    pub file_offset: u64,
    /// Device of the file.
    pub dev: u64,
    /// Inode of the file.
    pub ino: u64,
}

impl RegionSpec {
    /// One past the last guest address.
    pub fn end(&self) -> u64 {
        self.gpa + self.len
    }

    /// Describes `len` bytes at `file_offset` of `file` mapped at `gpa`, after checking that
    /// nvmed can register them: a memfd sealed against shrinking, page-aligned offset and length.
    pub fn check(file: &File, gpa: u64, len: u64, file_offset: u64) -> Result<Self, RegionError> {
        let seals = nix::fcntl::fcntl(file.as_fd(), nix::fcntl::FcntlArg::F_GET_SEALS)
            .map_err(|_| RegionError::NotMemfd { gpa, hint: MEMFD_HINT })?;
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(RegionError::NotSealed { gpa, seals, hint: MEMFD_HINT });
        }
        if seals & (libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE) != 0 {
            return Err(RegionError::WriteSealed { gpa });
        }
        if len == 0 || !file_offset.is_multiple_of(4096) || !len.is_multiple_of(4096) {
            return Err(RegionError::Unaligned { gpa, len, file_offset });
        }
        let meta = file.metadata().map_err(|source| RegionError::Stat { gpa, source })?;
        // The file is sealed against shrinking: a region inside it now stays inside it. One
        // past its end would kill the process (SIGBUS) at the first access to the tail.
        if file_offset.checked_add(len).is_none_or(|end| end > meta.len()) {
            return Err(RegionError::PastEof { gpa, len, file_offset, file_size: meta.len() });
        }
        Ok(Self { gpa, len, file_offset, dev: meta.dev(), ino: meta.ino() })
    }
}

/// A region registered with one nvmed session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Where it is and what backs it.
    pub spec: RegionSpec,
    /// The nvmed buffer covering it exactly.
    pub buffer: BufferId,
}

/// A contiguous piece of a guest range inside one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u32,
    /// Buffer of the region.
    pub buffer: BufferId,
    /// Offset inside that buffer.
    pub buf_offset: u64,
}

/// The guest address was not inside registered guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfRam {
    /// First address that is not covered.
    pub gpa: u64,
}

/// The VM's guest RAM regions registered with its nvmed session, each once, whichever queue
/// registered it first; the queues' rings use them ([`nvmed_client::NvmeRing::use_shared`]).
/// A region removed from the memory table leaves this map at once; its buffer is unregistered
/// when the last queue using it has no request on it left (the last clone is dropped).
#[derive(Debug, Clone, Default)]
pub struct SharedRegions(Arc<Mutex<HashMap<RegionSpec, SharedBuffer>>>);

impl SharedRegions {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<RegionSpec, SharedBuffer>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The buffer of region `spec` (in `file`), registered with `session` now unless another
    /// queue did already.
    pub fn get_or_register(
        &self,
        spec: &RegionSpec,
        file: &File,
        session: &NvmeSession,
    ) -> Result<SharedBuffer, nvmed_client::Error> {
        let mut map = self.map();
        if let Some(b) = map.get(spec) {
            return Ok(b.clone());
        }
        let fd: OwnedFd = file
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| nvmed_client::Error::Os { what: "dup", source: e })?;
        let buf = MemfdBuffer::from_sealed_memfd_range(fd, spec.file_offset, spec.len as usize)?;
        let shared = session.register_shared(buf)?;
        map.insert(*spec, shared.clone());
        Ok(shared)
    }

    /// Region `spec` left the memory table: the map lets its buffer go (the queues' rings let
    /// theirs go once their requests on it completed).
    pub fn forget(&self, spec: &RegionSpec) {
        self.map().remove(spec);
    }

    /// Regions registered.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Regions of one session, sorted by guest address, never overlapping.
#[derive(Debug, Default)]
pub struct RegionTable {
    regions: Vec<Region>,
}

impl RegionTable {
    /// The regions, sorted by address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Adds a region (it must not overlap another one).
    pub fn insert(&mut self, region: Region) {
        let i = self.regions.partition_point(|r| r.spec.gpa < region.spec.gpa);
        debug_assert!(i == 0 || self.regions[i - 1].spec.end() <= region.spec.gpa);
        debug_assert!(i == self.regions.len() || region.spec.end() <= self.regions[i].spec.gpa);
        self.regions.insert(i, region);
    }

    /// Removes and returns the regions not in `wanted` (exact match: address, length, file and
    /// offset), and returns the wanted regions that are not in the table yet.
    pub fn diff(&mut self, wanted: &[RegionSpec]) -> (Vec<Region>, Vec<RegionSpec>) {
        let mut gone = Vec::new();
        self.regions.retain(|r| {
            let keep = wanted.contains(&r.spec);
            if !keep {
                gone.push(*r);
            }
            keep
        });
        let new = wanted.iter().filter(|w| !self.regions.iter().any(|r| r.spec == **w)).copied().collect();
        (gone, new)
    }

    /// Splits `gpa..gpa+len` into pieces, one per region it crosses, appended to `out`.
    pub fn translate(&self, gpa: u64, len: u32, out: &mut impl Extend<Piece>) -> Result<(), OutOfRam> {
        let end = gpa.checked_add(u64::from(len)).ok_or(OutOfRam { gpa })?;
        let mut at = gpa;
        let mut i = self.regions.partition_point(|r| r.spec.end() <= at);
        while at < end {
            let r = self.regions.get(i).filter(|r| r.spec.gpa <= at).ok_or(OutOfRam { gpa: at })?;
            let piece_end = end.min(r.spec.end());
            out.extend(Some(Piece {
                gpa: at,
                len: (piece_end - at) as u32,
                buffer: r.buffer,
                buf_offset: at - r.spec.gpa,
            }));
            at = piece_end;
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(gpa: u64, len: u64, file_offset: u64) -> RegionSpec {
        RegionSpec { gpa, len, file_offset, dev: 1, ino: 7 }
    }

    /// QEMU's usual x86 layout: low RAM below the VGA hole, the rest above it, then RAM above 4G.
    fn table() -> RegionTable {
        let mut t = RegionTable::default();
        t.insert(Region { spec: spec(0xc0000, 0x7ff40000, 0xc0000), buffer: BufferId(2) });
        t.insert(Region { spec: spec(0, 0xa0000, 0), buffer: BufferId(1) });
        t.insert(Region { spec: spec(0x1_0000_0000, 0x4000_0000, 0x8000_0000), buffer: BufferId(3) });
        t
    }

    fn pieces(t: &RegionTable, gpa: u64, len: u32) -> Result<Vec<Piece>, OutOfRam> {
        let mut v = Vec::new();
        t.translate(gpa, len, &mut v).map(|_| v)
    }

    #[test]
    fn inside_one_region() {
        let t = table();
        assert_eq!(
            pieces(&t, 0x1000, 4096).unwrap(),
            vec![Piece { gpa: 0x1000, len: 4096, buffer: BufferId(1), buf_offset: 0x1000 }]
        );
        // Offsets are relative to the buffer, which starts at the region (not at the memfd start).
        assert_eq!(pieces(&t, 0xc1200, 512).unwrap()[0].buf_offset, 0x1200);
        assert_eq!(pieces(&t, 0x1_0000_0000 + 8192, 4096).unwrap()[0].buf_offset, 8192);
        // Last byte of a region.
        assert_eq!(pieces(&t, 0x9ffff, 1).unwrap()[0].buf_offset, 0x9ffff);
        assert_eq!(pieces(&t, 0, 0).unwrap(), vec![]);
    }

    #[test]
    fn split_at_a_boundary_between_adjacent_regions() {
        let mut t = RegionTable::default();
        t.insert(Region { spec: spec(0x10000, 0x10000, 0), buffer: BufferId(5) });
        t.insert(Region { spec: spec(0x20000, 0x10000, 0x10000), buffer: BufferId(6) });
        assert_eq!(
            pieces(&t, 0x1f000, 0x3000).unwrap(),
            vec![
                Piece { gpa: 0x1f000, len: 0x1000, buffer: BufferId(5), buf_offset: 0xf000 },
                Piece { gpa: 0x20000, len: 0x2000, buffer: BufferId(6), buf_offset: 0 },
            ]
        );
        // Exactly the end of the first region: one piece in the second.
        assert_eq!(pieces(&t, 0x20000, 16).unwrap().len(), 1);
    }

    #[test]
    fn holes_and_outside_are_refused() {
        let t = table();
        // Starts in the VGA hole.
        assert_eq!(pieces(&t, 0xa0000, 16), Err(OutOfRam { gpa: 0xa0000 }));
        // Starts in RAM, runs into the hole.
        assert_eq!(pieces(&t, 0x9f000, 0x2000), Err(OutOfRam { gpa: 0xa0000 }));
        // Past the end of RAM below 4G, and past everything.
        assert_eq!(pieces(&t, 0x8000_0000, 1), Err(OutOfRam { gpa: 0x8000_0000 }));
        assert!(pieces(&t, 0x1_4000_0000, 1).is_err());
        assert!(pieces(&t, 0x1_3fff_f000, 0x2000).is_err());
        // Wrapping the address space.
        assert!(pieces(&t, u64::MAX - 10, 100).is_err());
        assert!(pieces(&RegionTable::default(), 0, 1).is_err());
    }

    #[test]
    fn diff_keeps_identical_regions_and_replaces_changed_ones() {
        let mut t = table();
        let wanted =
            [spec(0, 0xa0000, 0), spec(0xc0000, 0x7ff40000, 0xc0000), spec(0x2_0000_0000, 0x1000, 0)];
        let (gone, new) = t.diff(&wanted);
        assert_eq!(gone.iter().map(|r| r.buffer).collect::<Vec<_>>(), vec![BufferId(3)]);
        assert_eq!(new, vec![spec(0x2_0000_0000, 0x1000, 0)]);
        assert_eq!(t.regions().len(), 2);
        // Same address, other file: replaced.
        let (gone, new) = t.diff(&[RegionSpec { ino: 8, ..spec(0, 0xa0000, 0) }]);
        assert_eq!(gone.len(), 2);
        assert_eq!(new.len(), 1);
    }

    #[test]
    fn only_sealed_memfds_are_accepted() {
        let f = File::from(nix::sys::memfd::memfd_create("x", nix::sys::memfd::MFdFlags::empty()).unwrap());
        f.set_len(8192).unwrap();
        // memfd without sealing allowed (F_SEAL_SEAL set by the kernel) and without SHRINK.
        assert!(matches!(RegionSpec::check(&f, 0, 8192, 0), Err(RegionError::NotSealed { .. })));
        // Not a memfd at all (a file-backed memory backend on a disk file or a device).
        let plain = File::open("/dev/null").unwrap();
        let e = RegionSpec::check(&plain, 0x1000, 8192, 0).unwrap_err();
        assert!(matches!(e, RegionError::NotMemfd { gpa: 0x1000, .. }));
        assert!(e.to_string().contains("memory-backend-memfd"), "{e}");
        let sealed = File::from(
            nix::sys::memfd::memfd_create("y", nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING).unwrap(),
        );
        sealed.set_len(3 << 12).unwrap();
        nix::fcntl::fcntl(
            sealed.as_fd(),
            nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_SHRINK),
        )
        .unwrap();
        let s = RegionSpec::check(&sealed, 0x4000, 8192, 4096).unwrap();
        assert_eq!((s.gpa, s.len, s.file_offset), (0x4000, 8192, 4096));
        assert!(matches!(RegionSpec::check(&sealed, 0, 8192, 512), Err(RegionError::Unaligned { .. })));
        // A region reaching past the end of its (sealed, so fixed-size) file is refused.
        assert!(matches!(
            RegionSpec::check(&sealed, 0x4000, 8192, 8192),
            Err(RegionError::PastEof { file_size: 0x3000, .. })
        ));
        assert!(matches!(RegionSpec::check(&sealed, 0, 16384, 0), Err(RegionError::PastEof { .. })));
    }
}
