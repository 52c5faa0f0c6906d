//! Eventfd and doorbell helpers for the wakeup handshakes.
//!
//! The broker's own wakeups (control requests, emulated interrupts) are eventfds. A ring's two
//! doorbells are Unix stream socket pairs instead ([`doorbell`]): an eventfd passed to a client
//! is the same open file on both sides, so a client could clear its `O_NONBLOCK` (a file status
//! flag) and fill its counter, and the broker's next write (or read) of it would block its I/O
//! thread for good. A socket pair's ends are separate open files, and [`ring_doorbell`] sends
//! with `MSG_DONTWAIT | MSG_NOSIGNAL` whatever the flags: it never blocks, and a peer gone is
//! an error, not a SIGPIPE (which would kill a C client whose broker restarted).

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

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

/// A doorbell: a non-blocking, close-on-exec Unix stream socket pair, as `(reader's end,
/// ringer's end)`. One end goes to the client. A signal is 8 bytes; a full socket buffer
/// already wakes its reader.
pub fn doorbell() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{setsockopt, shutdown, sockopt, Shutdown};
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (r, w) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    )?;
    // One way only, and a small buffer on the ringing side (the kernel's minimum, a few KiB):
    // a reader that never drains holds a few KiB of the ringer's memory, not the default ~200.
    shutdown(r.as_raw_fd(), Shutdown::Write)?;
    shutdown(w.as_raw_fd(), Shutdown::Read)?;
    let _ = setsockopt(&w, sockopt::SndBuf, &4096);
    Ok((r, w))
}

/// Rings a doorbell (see [`doorbell`]): never blocks, never raises SIGPIPE. Returns false if
/// the other end is gone.
pub fn ring_doorbell(fd: impl AsFd) -> bool {
    use nix::sys::socket::{send, MsgFlags};
    !matches!(
        send(fd.as_fd().as_raw_fd(), &1u64.to_ne_bytes(), MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL),
        Err(nix::Error::EPIPE | nix::Error::ECONNRESET | nix::Error::ENOTCONN)
    )
}

/// Empties a doorbell without blocking: `Some(whether it was rung)`, or `None` once the other
/// end is gone (closed: it will never ring again, and a poll of it reports readiness for good).
pub fn drain_doorbell(fd: impl AsFd) -> Option<bool> {
    use nix::sys::socket::{recv, MsgFlags};
    let mut buf = [0u8; 512];
    let mut any = false;
    for _ in 0..8 {
        match recv(fd.as_fd().as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return None,
            Ok(n) => {
                any = true;
                if n < buf.len() {
                    break;
                }
            }
            Err(nix::Error::ECONNRESET) => return None,
            Err(_) => break,
        }
    }
    Some(any)
}

/// Signals an eventfd (adds one to its counter), waking a sleeper. Never blocks on a
/// non-blocking eventfd; a full counter (EAGAIN) already wakes. (Doorbells: [`ring_doorbell`].)
pub fn signal(fd: impl AsFd) {
    let _ = nix::unistd::write(fd, &1u64.to_ne_bytes());
}

/// Empties an eventfd or a doorbell; returns whether it was signalled. Reads a bounded amount:
/// a peer writing as fast as this reads cannot hold the caller here, and what it writes later
/// wakes the caller again.
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

    #[test]
    fn a_doorbell_rings_and_drains_and_neither_side_can_make_the_other_block() {
        let (r, w) = doorbell().unwrap();
        assert_eq!(drain_doorbell(&r), Some(false), "nothing rung yet");
        assert!(ring_doorbell(&w));
        assert!(ring_doorbell(&w));
        assert_eq!(drain_doorbell(&r), Some(true));
        assert_eq!(drain_doorbell(&r), Some(false), "drained");
        // Each end made blocking (as a hostile client could its own): the other end's calls
        // still return at once (separate open files; MSG_DONTWAIT besides).
        for fd in [&r, &w] {
            // SAFETY: fcntl on a descriptor this test owns.
            unsafe {
                let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
                assert_eq!(libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK), 0);
            }
        }
        for _ in 0..100_000 {
            ring_doorbell(&w); // a full buffer: EAGAIN, ignored
        }
        assert_eq!(drain_doorbell(&r), Some(true));
        while drain_doorbell(&r) == Some(true) {}
        assert_eq!(drain_doorbell(&r), Some(false), "an empty doorbell returns at once");
        // The other end gone: ringing says so (no SIGPIPE), draining says so.
        drop(r);
        assert!(!ring_doorbell(&w));
        let (r, w) = doorbell().unwrap();
        drop(w);
        assert_eq!(drain_doorbell(&r), None);
    }
}
