//! Eventfd and doorbell helpers for the wakeup handshakes.
//!
//! The broker's own wakeups (control requests, emulated interrupts) are eventfds. A ring's two
//! doorbells are pipes instead ([`doorbell`]): an eventfd passed to a client is the same open
//! file on both sides, so a client could clear its `O_NONBLOCK` (a file status flag) and fill
//! its counter, and the broker's next write (or read) of it would block its I/O thread for
//! good. A pipe's ends are separate open files: the flags of the broker's end are its own.

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

/// A doorbell: a non-blocking, close-on-exec pipe, as `(read end, write end)`, holding one
/// page (a signal is 8 bytes; a full pipe already wakes its reader). One end goes to the client.
pub fn doorbell() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)?;
    // Smaller than the default 16 pages (a broker holds two per ring); failing is harmless.
    let _ = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096));
    Ok((r, w))
}

/// Signals an eventfd (adds one to its counter) or a doorbell (8 bytes into the pipe), waking
/// a sleeper. Never blocks on the caller's own non-blocking end; a full counter or pipe
/// (EAGAIN) already wakes.
pub fn signal(fd: impl AsFd) {
    let _ = nix::unistd::write(fd, &1u64.to_ne_bytes());
}

/// Empties an eventfd or a doorbell; returns whether it was signalled. Reads a bounded amount
/// (a full pipe of one page at most): a peer writing as fast as this reads cannot hold the
/// caller here, and what it writes later wakes the caller again.
pub fn drain(fd: impl AsFd) -> bool {
    let mut buf = [0u8; 512];
    let mut any = false;
    for _ in 0..8 {
        match nix::unistd::read(fd.as_fd(), &mut buf) {
            Ok(n) if n > 0 => {
                any = true;
                if n < buf.len() {
                    break;
                }
            }
            _ => break,
        }
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_doorbell_wakes_and_drains_and_the_peer_cannot_make_it_block() {
        let (r, w) = doorbell().unwrap();
        assert!(!drain(&r), "nothing signalled yet");
        signal(&w);
        signal(&w);
        assert!(drain(&r));
        assert!(!drain(&r), "drained");
        // The peer's end made blocking (as a hostile client could): the other end stays
        // non-blocking, so filling the pipe from here returns, never blocks.
        // SAFETY: fcntl on a descriptor this test owns.
        let flags = unsafe { libc::fcntl(r.as_raw_fd(), libc::F_GETFL) };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) }, 0);
        for _ in 0..100_000 {
            signal(&w); // a full pipe: EAGAIN, ignored
        }
        // SAFETY: as above.
        assert_eq!(unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETFL, flags) }, 0);
        assert!(drain(&r));
        // And the other way round: the write end made blocking, the read end does not wait.
        // SAFETY: as above.
        let wflags = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETFL) };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETFL, wflags & !libc::O_NONBLOCK) }, 0);
        while drain(&r) {}
        assert!(!drain(&r), "an empty pipe read returns at once");
    }
}
