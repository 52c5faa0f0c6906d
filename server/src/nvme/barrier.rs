//! Memory barriers between the CPU and a DMA-capable device.
//!
//! Rust's `fence` orders memory between CPUs (the inner-shareable domain on ARM); a device sits
//! in the outer-shareable domain, so on aarch64 the driver needs `dmb osh*` where Linux uses
//! `dma_wmb()` / `dma_rmb()`. On x86-64, stores are not reordered with other stores, and loads
//! not with other loads, for write-back memory, and an uncached MMIO write is not passed by
//! earlier stores: a compiler fence is all that is needed (as Linux's `dma_wmb` is `barrier()`).
//! Other architectures fall back to a full `SeqCst` fence, which is stronger than needed on most
//! but is not verified on any: nvmed is tested on x86-64, and aarch64 is reasoned about only.

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
use std::sync::atomic::fence;
use std::sync::atomic::{compiler_fence, Ordering};

/// Orders the CPU's writes to DMA memory (e.g. an SQ entry) before a later write that lets the
/// device read them (the doorbell).
#[inline(always)]
pub fn dma_wmb() {
    #[cfg(target_arch = "aarch64")]
    // SAFETY: a barrier instruction: no memory access, no register change.
    unsafe {
        std::arch::asm!("dmb oshst", options(nostack, preserves_flags));
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    fence(Ordering::SeqCst);
    compiler_fence(Ordering::SeqCst);
}

/// Orders the CPU's read of a device-written flag (a CQ entry's phase bit) before its later
/// reads of what the flag vouches for (the rest of the entry).
#[inline(always)]
pub fn dma_rmb() {
    #[cfg(target_arch = "aarch64")]
    // SAFETY: a barrier instruction: no memory access, no register change.
    unsafe {
        std::arch::asm!("dmb oshld", options(nostack, preserves_flags));
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    fence(Ordering::SeqCst);
    compiler_fence(Ordering::SeqCst);
}
