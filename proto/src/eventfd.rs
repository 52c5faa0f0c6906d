//! Eventfd helpers for the wakeup handshakes.

use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};

/// Creates a non-blocking, close-on-exec eventfd.
pub fn new_eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with constant flags; the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to the eventfd's counter, waking a sleeper. A full counter (EAGAIN) already wakes.
pub fn signal(fd: impl AsFd) {
    let _ = nix::unistd::write(fd, &1u64.to_ne_bytes());
}

/// Resets the eventfd's counter; returns whether it was signalled.
pub fn drain(fd: impl AsFd) -> bool {
    let mut buf = [0u8; 8];
    matches!(nix::unistd::read(fd, &mut buf), Ok(8))
}
