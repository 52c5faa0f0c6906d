//! Every raw-pointer access of the C API, in one place. The callers (the `extern "C"`
//! functions) pass on the C caller's promises, documented in each function's `# Safety`.

use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::{fail, nvmed_ring, Failure, NVMED_E_PANIC};

/// The handle behind a ring pointer, or `NVMED_E_INVAL` for a null pointer.
///
/// # Safety
/// `ring` is null or a pointer `nvmed_open` returned and `nvmed_close` has not freed, not used by
/// another thread at the same time.
pub(crate) unsafe fn ring<'a>(ring: *mut nvmed_ring) -> Result<&'a mut nvmed_ring, Failure> {
    // SAFETY: the caller promises a live handle, used by this thread alone, or null.
    unsafe { ring.as_mut() }.ok_or_else(|| Failure::inval("the ring handle is NULL"))
}

/// A file path argument: any bytes but NUL, as the kernel takes them.
///
/// # Safety
/// `s` is null or points to a NUL-terminated string that stays valid during the call.
pub(crate) unsafe fn path_arg(s: *const c_char, what: &str) -> Result<std::path::PathBuf, Failure> {
    use std::os::unix::ffi::OsStrExt;
    if s.is_null() {
        return Err(Failure::inval(format!("{what} is NULL")));
    }
    // SAFETY: non-null, and the caller promises a NUL-terminated string.
    let c = unsafe { CStr::from_ptr(s) };
    Ok(std::ffi::OsStr::from_bytes(c.to_bytes()).into())
}

/// A C string argument that need not be UTF-8 (invalid bytes become U+FFFD).
///
/// # Safety
/// `s` is null or points to a NUL-terminated string that stays valid during the call.
pub(crate) unsafe fn str_arg_lossy(s: *const c_char, what: &str) -> Result<String, Failure> {
    if s.is_null() {
        return Err(Failure::inval(format!("{what} is NULL")));
    }
    // SAFETY: non-null, and the caller promises a NUL-terminated string.
    let c = unsafe { CStr::from_ptr(s) };
    Ok(c.to_string_lossy().into_owned())
}

/// Stores `v` through an out-pointer.
///
/// # Safety
/// `p` is null or valid for writing one `T`.
pub(crate) unsafe fn put<T>(p: *mut T, v: T, what: &str) -> Result<(), Failure> {
    if p.is_null() {
        return Err(Failure::inval(format!("{what} is NULL")));
    }
    // SAFETY: non-null and, as the caller promises, valid for writing a `T` (write: no drop of
    // whatever the C caller left there).
    unsafe { p.write(v) };
    Ok(())
}

/// Reads an optional in-struct.
///
/// # Safety
/// `p` is null or points to a valid `T`.
pub(crate) unsafe fn opt_in<'a, T>(p: *const T) -> Option<&'a T> {
    // SAFETY: null or valid, as the caller promises.
    unsafe { p.as_ref() }
}

/// An array argument of `count` elements (none when `count` is 0).
///
/// # Safety
/// `p` is valid for reading `count` `T`s (or `count` is 0).
pub(crate) unsafe fn slice_in<'a, T>(p: *const T, count: usize, what: &str) -> Result<&'a [T], Failure> {
    if count == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Failure::inval(format!("{what} is NULL")));
    }
    // SAFETY: non-null, and the caller promises `count` readable, initialized elements.
    Ok(unsafe { std::slice::from_raw_parts(p, count) })
}

/// An output array of `count` elements.
///
/// # Safety
/// `p` is valid for writing `count` `T`s (or `count` is 0).
pub(crate) unsafe fn slice_out<'a, T: Copy>(
    p: *mut T,
    count: usize,
    what: &str,
) -> Result<&'a mut [T], Failure> {
    if count == 0 {
        return Ok(&mut []);
    }
    if p.is_null() {
        return Err(Failure::inval(format!("{what} is NULL")));
    }
    // SAFETY: non-null and writable for `count` elements (the caller's promise); `T: Copy` has
    // no drop and every bit pattern the C caller left is overwritten before being read.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, count) })
}

/// Writes `text` NUL-terminated into `buf` of `len` bytes (truncated to fit, as snprintf), and
/// returns the length of the whole text.
///
/// # Safety
/// `buf` is valid for writing `len` bytes (or `len` is 0).
pub(crate) unsafe fn copy_text(text: &str, buf: *mut c_char, len: usize) -> Result<usize, Failure> {
    if len > 0 {
        if buf.is_null() {
            return Err(Failure::inval("the text buffer is NULL"));
        }
        let n = text.len().min(len - 1);
        // SAFETY: `buf` has room for `len` bytes (caller's promise), and n + 1 <= len.
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr().cast::<c_char>(), buf, n);
            buf.add(n).write(0);
        }
    }
    Ok(text.len())
}

/// Runs one C API call: its error becomes a negative code with the text kept for
/// `nvmed_last_error`, and a panic never unwinds into C (it becomes `NVMED_E_PANIC`; the ring
/// it happened on is then poisoned: every later call on it but `nvmed_close` fails).
pub(crate) fn guard(ring: Option<*mut nvmed_ring>, f: impl FnOnce() -> Result<i32, Failure>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => fail(e),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            if let Some(r) = ring {
                // SAFETY: the pointer was a valid handle for this call (it got this far only
                // through `ring()`), used by this thread alone; only its flag is written.
                if let Some(r) = unsafe { r.as_mut() } {
                    r.poisoned = true;
                }
            }
            fail(Failure {
                code: NVMED_E_PANIC,
                message: format!("internal error (panic) in libnvmed: {msg}"),
            })
        }
    }
}

/// A duplicate of a file descriptor the caller keeps.
///
/// # Safety
/// `fd` is an open file descriptor during the call.
pub(crate) unsafe fn dup_fd(fd: std::ffi::c_int) -> Result<std::os::fd::OwnedFd, Failure> {
    if fd < 0 {
        return Err(Failure::inval(format!("file descriptor {fd} is negative")));
    }
    // SAFETY: the caller promises `fd` is open for the duration of this call, and the borrow
    // ends with it (only its duplicate is kept).
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    borrowed.try_clone_to_owned().map_err(|e| Failure {
        code: crate::NVMED_E_OS,
        message: format!("dup of file descriptor {fd}: {e}"),
    })
}
