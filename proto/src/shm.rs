//! Shared memory mappings, reached only through raw pointers.
//!
//! Memory shared with another process (or a device) can change at any time, so this module never
//! hands out a Rust reference to it: entries and values are copied in and out with volatile
//! accesses, and the index words are read and written as atomics created for the duration of
//! one access. Bulk data (`copy_in`, `copy_out`, `copy_to`, `fill`) moves with plain
//! `memcpy`/`memmove` through raw pointers, as rust-vmm's vm-memory moves guest memory: bytes
//! another party changes meanwhile are copied as whatever they were, and nothing read that way
//! is trusted as a value (entries that decide anything are read with the volatile accessors).

use std::io;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use zerocopy::{FromBytes, Immutable, IntoBytes};

/// A page-aligned read/write mapping, unmapped on drop.
#[derive(Debug)]
pub struct SharedMemory {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; all accesses go through raw pointers
// with volatile or atomic operations, so sharing the handle between threads is sound.
unsafe impl Send for SharedMemory {}
// SAFETY: see `Send`; no method hands out references into the mapping.
unsafe impl Sync for SharedMemory {}

impl SharedMemory {
    fn mmap(fd: Option<BorrowedFd<'_>>, offset: u64, len: usize, flags: libc::c_int) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "cannot map zero bytes"));
        }
        let raw_fd = fd.map_or(-1, |f| std::os::fd::AsRawFd::as_raw_fd(&f));
        // SAFETY: a fresh mapping at an address the kernel picks; it aliases no Rust object.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw_fd,
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { ptr: NonNull::new(ptr.cast()).expect("mmap returned null"), len })
    }

    /// Maps `len` bytes of `fd` shared (MAP_SHARED), readable and writable.
    pub fn map_shared(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        Self::mmap(Some(fd), 0, len, libc::MAP_SHARED)
    }

    /// Maps `len` bytes at `offset` (page aligned) of `fd` shared, readable and writable.
    pub fn map_shared_at(fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<Self> {
        Self::mmap(Some(fd), offset, len, libc::MAP_SHARED)
    }

    /// Allocates `len` bytes of zeroed, private, anonymous memory.
    pub fn anonymous(len: usize) -> io::Result<Self> {
        Self::mmap(None, 0, len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
    }

    /// Backs every page of the mapping with memory now, in huge pages where the kernel has them
    /// (`MADV_HUGEPAGE`, then `MADV_POPULATE_WRITE`, Linux 5.14; older kernels get each page
    /// written once instead, by an atomic add of zero to one of its bytes), so no access faults
    /// later: an emulated medium then costs the same at its first touch as at its next, like a
    /// device's. Meant for memory this process owns (anonymous): on a file another process can
    /// shrink, the older kernels' way would fault past its end.
    pub fn populate(&self) -> io::Result<()> {
        // SAFETY: the range is exactly this mapping; the advice changes no byte of it (a kernel
        // without transparent huge pages refuses it, which changes nothing either).
        let _ = unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, libc::MADV_HUGEPAGE) };
        // SAFETY: as above; populating changes no byte.
        let r = unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, libc::MADV_POPULATE_WRITE) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
        for offset in (0..self.len).step_by(4096) {
            let p = self.check(offset, 1, 1);
            // SAFETY: in bounds (checked) and lives as long as `self`; the atomic exists for this
            // call only, and adding zero atomically changes no byte, whoever else writes it.
            unsafe { std::sync::atomic::AtomicU8::from_ptr(p) }.fetch_add(0, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never true for a live mapping).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start address of the mapping, for handing to a device or the kernel.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    #[inline]
    fn check(&self, offset: usize, size: usize, align: usize) -> *mut u8 {
        assert!(
            offset.checked_add(size).is_some_and(|end| end <= self.len),
            "shared memory access {offset}+{size} past {}",
            self.len
        );
        assert!(offset.is_multiple_of(align), "misaligned shared memory access at {offset}");
        // SAFETY: offset + size <= len was checked above, so the result stays inside the mapping.
        unsafe { self.ptr.as_ptr().add(offset) }
    }

    /// Atomically loads the `u32` at `offset` (4-byte aligned).
    #[inline]
    pub fn load_u32(&self, offset: usize, order: Ordering) -> u32 {
        let p = self.check(offset, 4, 4);
        // SAFETY: `p` is in bounds, aligned, and lives as long as `self`; the atomic reference
        // exists only for this call and atomics allow concurrent modification by others.
        unsafe { AtomicU32::from_ptr(p.cast()) }.load(order)
    }

    /// Atomically stores `value` at `offset` (4-byte aligned).
    #[inline]
    pub fn store_u32(&self, offset: usize, value: u32, order: Ordering) {
        let p = self.check(offset, 4, 4);
        // SAFETY: as in `load_u32`.
        unsafe { AtomicU32::from_ptr(p.cast()) }.store(value, order)
    }

    /// Atomically loads the `u64` at `offset` (8-byte aligned).
    #[inline]
    pub fn load_u64(&self, offset: usize, order: Ordering) -> u64 {
        let p = self.check(offset, 8, 8);
        // SAFETY: as in `load_u32` (8 bytes in bounds, 8-aligned).
        unsafe { AtomicU64::from_ptr(p.cast()) }.load(order)
    }

    /// Atomically stores `value` at `offset` (8-byte aligned).
    #[inline]
    pub fn store_u64(&self, offset: usize, value: u64, order: Ordering) {
        let p = self.check(offset, 8, 8);
        // SAFETY: as in `load_u64`.
        unsafe { AtomicU64::from_ptr(p.cast()) }.store(value, order)
    }

    /// Atomically ORs `bits` into the `u32` at `offset`.
    #[inline]
    pub fn fetch_or_u32(&self, offset: usize, bits: u32, order: Ordering) -> u32 {
        let p = self.check(offset, 4, 4);
        // SAFETY: as in `load_u32`.
        unsafe { AtomicU32::from_ptr(p.cast()) }.fetch_or(bits, order)
    }

    /// Atomically clears `bits` in the `u32` at `offset`.
    #[inline]
    pub fn fetch_and_not_u32(&self, offset: usize, bits: u32, order: Ordering) -> u32 {
        let p = self.check(offset, 4, 4);
        // SAFETY: as in `load_u32`.
        unsafe { AtomicU32::from_ptr(p.cast()) }.fetch_and(!bits, order)
    }

    /// Copies a `T` out of the mapping (one volatile read; any bit pattern is a valid `T`).
    #[inline]
    pub fn read<T: FromBytes>(&self, offset: usize) -> T {
        let p = self.check(offset, size_of::<T>(), align_of::<T>());
        // SAFETY: in bounds and aligned (checked); `T: FromBytes` accepts any bytes, so a value
        // torn by a concurrent writer is still a valid `T`.
        unsafe { std::ptr::read_volatile(p.cast::<T>()) }
    }

    /// Copies a `T` into the mapping (one volatile write).
    #[inline]
    pub fn write<T: IntoBytes + Immutable>(&self, offset: usize, value: T) {
        let p = self.check(offset, size_of::<T>(), align_of::<T>());
        // SAFETY: in bounds and aligned (checked); nothing in this process holds a reference here.
        unsafe { std::ptr::write_volatile(p.cast::<T>(), value) }
    }

    /// Hints that the cache line holding `offset` will be read soon (a no-op where the target
    /// has no prefetch instruction). Never faults; an offset past the end is ignored.
    #[inline]
    pub fn prefetch_read(&self, offset: usize) {
        if offset < self.len {
            // The pointer stays inside the mapping (checked); a prefetch reads nothing into Rust.
            prefetch::read(self.ptr.as_ptr().wrapping_add(offset));
        }
    }

    /// Hints that the cache line holding `offset` will be written soon: fetches it for writing
    /// (PREFETCHW where the CPU has it), so the store that follows finds the line owned instead of
    /// waiting for the other side's cache to give it up. Never faults; past the end is ignored.
    #[inline]
    pub fn prefetch_write(&self, offset: usize) {
        if offset < self.len {
            prefetch::write(self.ptr.as_ptr().wrapping_add(offset));
        }
    }

    /// Writes `words` at `offset` (8-byte aligned), one volatile 8-byte store each.
    #[inline]
    pub fn write_words<const N: usize>(&self, offset: usize, words: [u64; N]) {
        let p = self.check(offset, N * 8, 8).cast::<u64>();
        for (i, w) in words.into_iter().enumerate() {
            // SAFETY: `offset + 8 * N` is in bounds and 8-aligned (checked), so word `i < N` is
            // too; nothing in this process holds a reference to the mapping.
            unsafe { std::ptr::write_volatile(p.add(i), w) }
        }
    }

    /// Copies `out.len()` bytes starting at `offset` into `out`.
    pub fn copy_out(&self, offset: usize, out: &mut [u8]) {
        let p = self.check(offset, out.len(), 1);
        // SAFETY: source range checked in bounds; `out` is a distinct local slice.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) }
    }

    /// Copies `data` into the mapping at `offset`.
    pub fn copy_in(&self, offset: usize, data: &[u8]) {
        let p = self.check(offset, data.len(), 1);
        // SAFETY: destination range checked in bounds; `data` is a distinct local slice.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) }
    }

    /// Copies `len` bytes at `offset` of this mapping to `dst_offset` of `dst` (which may be
    /// this mapping too; overlapping ranges are copied as by `memmove`). Neither side is
    /// referenced: another process or a device may change either range meanwhile, and then the
    /// copy holds whatever bytes were there.
    pub fn copy_to(&self, offset: usize, dst: &SharedMemory, dst_offset: usize, len: usize) {
        let s = self.check(offset, len, 1);
        let d = dst.check(dst_offset, len, 1);
        // SAFETY: both ranges were checked in bounds of their live mappings; `copy` allows
        // overlap, and no Rust reference to either range exists.
        unsafe { std::ptr::copy(s, d, len) }
    }

    /// As [`SharedMemory::copy_to`] (ranges must not overlap), but the kernel copies, so a
    /// page that cannot be faulted in on either side (a hole a client punched in a hugetlb
    /// memfd that no free huge page can fill) fails the copy with `EFAULT` instead of killing
    /// this process with SIGBUS. Slower (a system call): for memory that may have such holes.
    pub fn copy_to_fault_safe(
        &self,
        offset: usize,
        dst: &SharedMemory,
        dst_offset: usize,
        len: usize,
    ) -> io::Result<()> {
        let s = self.check(offset, len, 1);
        let d = dst.check(dst_offset, len, 1);
        // SAFETY: both ranges were checked in bounds of live mappings; no Rust reference to
        // either exists.
        unsafe { kernel_copy(d, s, len) }
    }

    /// As [`SharedMemory::copy_out`], through the kernel: a page that cannot be faulted in
    /// returns `EFAULT` instead of raising SIGBUS (see [`SharedMemory::copy_to_fault_safe`]).
    pub fn copy_out_fault_safe(&self, offset: usize, out: &mut [u8]) -> io::Result<()> {
        let src = self.check(offset, out.len(), 1);
        // SAFETY: the source range was checked in bounds of the live mapping; `out` is a local
        // slice.
        unsafe { kernel_copy(out.as_mut_ptr(), src, out.len()) }
    }

    /// As [`SharedMemory::read`], through the kernel: a page that cannot be faulted in returns
    /// `EFAULT` instead of raising SIGBUS (see [`SharedMemory::copy_to_fault_safe`]).
    pub fn read_fault_safe<T: FromBytes + IntoBytes>(&self, offset: usize) -> io::Result<T> {
        let src = self.check(offset, size_of::<T>(), align_of::<T>());
        let mut value = T::new_zeroed();
        let bytes = value.as_mut_bytes();
        let local = libc::iovec { iov_base: bytes.as_mut_ptr().cast(), iov_len: bytes.len() };
        let remote = libc::iovec { iov_base: src.cast(), iov_len: bytes.len() };
        // SAFETY: the source range was checked in bounds of the live mapping and the destination
        // is a local value's bytes; the kernel reports a fault as EFAULT.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        if n == bytes.len() as isize {
            Ok(value)
        } else if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Err(io::Error::from_raw_os_error(libc::EFAULT))
        }
    }

    /// Fills `len` bytes at `offset` with `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) {
        let p = self.check(offset, len, 1);
        // SAFETY: range checked in bounds.
        unsafe { std::ptr::write_bytes(p, byte, len) }
    }
}

/// Copies `len` bytes from `src` to `dst` (both in this process) through the kernel
/// (`process_vm_readv`), which reports a page that cannot be faulted in as `EFAULT` instead of
/// raising SIGBUS.
///
/// # Safety
/// Both ranges are mapped in this process for `len` bytes (their contents may change meanwhile).
unsafe fn kernel_copy(dst: *mut u8, src: *const u8, len: usize) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        let local = libc::iovec { iov_base: dst.wrapping_add(done).cast(), iov_len: len - done };
        let remote =
            libc::iovec { iov_base: src.wrapping_add(done) as *mut libc::c_void, iov_len: len - done };
        // SAFETY: the caller's promise; the kernel reads and writes through this process's page
        // tables and reports a fault as EFAULT.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(io::Error::from_raw_os_error(libc::EFAULT)),
            _ => return Err(io::Error::last_os_error()),
        }
    }
    Ok(())
}

impl SharedMemory {
    /// Unmaps now and reports the result (dropping unmaps too, but can only count a failure).
    pub fn unmap(self) -> io::Result<()> {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: unmaps exactly the range this value mapped; `this` is never used again.
        let r = unsafe { libc::munmap(this.ptr.as_ptr().cast(), this.len) };
        if r == 0 {
            Ok(())
        } else {
            UNMAP_FAILURES.fetch_add(1, Ordering::Relaxed);
            Err(io::Error::last_os_error())
        }
    }
}

/// munmap calls that failed in this process (each one a mapping still in place).
pub static UNMAP_FAILURES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range this value mapped; no references into it exist.
        let r = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if r != 0 {
            UNMAP_FAILURES.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Cache prefetch hints. They never fault and change no memory, whatever the address.
mod prefetch {
    #[cfg(target_arch = "x86_64")]
    #[inline]
    pub(super) fn read(p: *const u8) {
        // SAFETY: PREFETCHT0 only loads a line into the cache; it never faults or writes, for any
        // address, and creates no reference.
        unsafe {
            core::arch::asm!("prefetcht0 [{p}]", p = in(reg) p, options(nostack, preserves_flags, readonly))
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    pub(super) fn write(p: *const u8) {
        if has_prefetchw() {
            // SAFETY: PREFETCHW (present: checked) only brings a line into the cache in an
            // exclusive state; it never faults or writes, for any address.
            unsafe {
                core::arch::asm!("prefetchw [{p}]", p = in(reg) p, options(nostack, preserves_flags, readonly))
            }
        } else {
            read(p);
        }
    }

    /// Whether the CPU has PREFETCHW (AMD since K8, Intel since Broadwell), detected once.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    fn has_prefetchw() -> bool {
        use std::sync::atomic::{AtomicU8, Ordering};
        static STATE: AtomicU8 = AtomicU8::new(0); // 0 unknown, 1 no, 2 yes
        match STATE.load(Ordering::Relaxed) {
            0 => {
                // CPUID 8000_0001h ECX bit 8: PREFETCHW (AMD's 3DNowPrefetch, Intel's PRFCHW).
                let max_ext = core::arch::x86_64::__cpuid(0x8000_0000).eax;
                let yes =
                    max_ext >= 0x8000_0001 && core::arch::x86_64::__cpuid(0x8000_0001).ecx & (1 << 8) != 0;
                STATE.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
                yes
            }
            s => s == 2,
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    #[inline]
    pub(super) fn read(_p: *const u8) {}

    #[cfg(not(target_arch = "x86_64"))]
    #[inline]
    pub(super) fn write(_p: *const u8) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident pages of `mem`, by `mincore`.
    fn resident(mem: &SharedMemory) -> usize {
        let mut v = vec![0u8; mem.len().div_ceil(4096)];
        // SAFETY: `v` has one byte per page of the mapping, which is page aligned.
        assert_eq!(unsafe { libc::mincore(mem.as_ptr().cast(), mem.len(), v.as_mut_ptr()) }, 0);
        v.iter().filter(|&&b| b & 1 != 0).count()
    }

    #[test]
    fn populate_maps_every_page_and_changes_no_byte() {
        let mem = SharedMemory::anonymous(64 * 4096).unwrap();
        mem.store_u64(5 * 4096 + 8, 0x1234_5678, Ordering::Relaxed);
        let before = resident(&mem);
        mem.populate().unwrap();
        assert_eq!((before, resident(&mem)), (1, 64), "pages mapped before and after");
        assert_eq!(mem.load_u64(5 * 4096 + 8, Ordering::Relaxed), 0x1234_5678);
        assert_eq!(mem.load_u64(63 * 4096, Ordering::Relaxed), 0);
    }

    #[test]
    fn fault_safe_copies_report_a_page_that_cannot_be_faulted_in() {
        use std::os::fd::AsFd;
        let fd = nix::sys::memfd::memfd_create("f", nix::sys::memfd::MFdFlags::empty()).unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(2 * 4096).unwrap();
        let mem = SharedMemory::map_shared(file.as_fd(), 2 * 4096).unwrap();
        let other = SharedMemory::anonymous(4096).unwrap();
        mem.store_u64(8, 42, Ordering::Relaxed);
        mem.copy_to_fault_safe(0, &other, 0, 64).unwrap();
        assert_eq!(other.load_u64(8, Ordering::Relaxed), 42);
        assert_eq!(mem.read_fault_safe::<u64>(8).unwrap(), 42);
        let mut local = [0u8; 16];
        mem.copy_out_fault_safe(8, &mut local).unwrap();
        assert_eq!(u64::from_ne_bytes(local[..8].try_into().unwrap()), 42);
        // The second page is cut off: touching it directly would raise SIGBUS.
        file.set_len(4096).unwrap();
        let e = mem.copy_to_fault_safe(4096, &other, 0, 64).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFAULT), "{e}");
        assert!(other.copy_to_fault_safe(0, &mem, 4096 + 8, 8).is_err(), "writing into the hole");
        assert!(mem.read_fault_safe::<u64>(4096).is_err());
        assert!(mem.copy_out_fault_safe(4090, &mut local).is_err());
        // Across the edge: the part before it is no success either.
        assert!(mem.copy_to_fault_safe(4000, &other, 0, 200).is_err());
    }
}
