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
    // The ringer sends bytes, never descriptors: the reader refuses them where the kernel can
    // (6.16+; see `crate::transport::accept_descriptors`, and [`drain_untrusted_doorbell`]
    // for older kernels).
    if crate::transport::descriptors_refusable() {
        crate::transport::accept_descriptors(r.as_fd(), false)?;
    }
    Ok((r, w))
}

/// What [`drain_untrusted_doorbell`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Nothing was rung.
    Quiet,
    /// It was rung (and is empty now).
    Rung,
    /// The ringer's end is closed: it will never ring again (and a poll of it reports
    /// readiness for good).
    Closed,
    /// The ringer sent descriptors with its bytes (a kernel before 6.16, which cannot refuse
    /// them): they were left queued, unread. Stop reading this doorbell; its last descriptor
    /// must be closed by a thread that may wait (their closing may block as long as their
    /// sender likes).
    Descriptors,
}

/// [`drain_doorbell`] for a doorbell made by [`doorbell`] whose ringer is not trusted (the
/// broker's end of a client's submit doorbell): never makes the calling thread close a
/// descriptor the ringer sent (closing one can block as long as its sender likes: a TCP socket
/// lingering, a file on a FUSE mount it serves, whose flush it never answers). Where the kernel
/// refuses descriptors on the doorbell (6.16+) nothing can arrive; before, each read is first
/// a peek without room for control data (descriptors are then only reported, never
/// installed), and bytes are taken only up to where the peek found none.
pub fn drain_untrusted_doorbell(fd: impl AsFd) -> Drained {
    if crate::transport::descriptors_refusable() {
        return match drain_doorbell(fd) {
            None => Drained::Closed,
            Some(true) => Drained::Rung,
            Some(false) => Drained::Quiet,
        };
    }
    drain_by_peeking(fd.as_fd())
}

fn drain_by_peeking(fd: std::os::fd::BorrowedFd<'_>) -> Drained {
    use nix::sys::socket::{recv, recvmsg, MsgFlags};
    let mut buf = [0u8; 512];
    let mut any = false;
    for _ in 0..8 {
        let (n, passed) = {
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            // No room for control data: descriptors in the peeked messages are only reported
            // (MSG_CTRUNC), never installed here; the kernel just drops the references the peek
            // took, so no close (and no file's flush) runs in this thread.
            let peek = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
            match recvmsg::<()>(fd.as_raw_fd(), &mut iov, None, peek) {
                Ok(m) => (m.bytes, m.flags.contains(MsgFlags::MSG_CTRUNC)),
                Err(nix::Error::ECONNRESET) => return Drained::Closed,
                Err(_) => break,
            }
        };
        if passed {
            return Drained::Descriptors;
        }
        if n == 0 {
            return Drained::Closed;
        }
        // Exactly the peeked bytes: messages queued after them (maybe with descriptors) stay.
        match recv(fd.as_raw_fd(), &mut buf[..n], MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return Drained::Closed,
            Ok(_) => any = true,
            Err(nix::Error::ECONNRESET) => return Drained::Closed,
            Err(_) => break,
        }
        if n < buf.len() {
            break;
        }
    }
    if any {
        Drained::Rung
    } else {
        Drained::Quiet
    }
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
    fn an_untrusted_ringer_cannot_make_the_reader_close_what_it_sent() {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        // The peeking drain (what kernels before 6.16 get), on a plain pair that takes
        // descriptors: a pipe's write end sent with a ring is never closed by the drain.
        let (r, w) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            None,
            nix::sys::socket::SockFlag::SOCK_NONBLOCK | nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        assert!(ring_doorbell(&w));
        assert_eq!(drain_by_peeking(r.as_fd()), Drained::Rung);
        assert_eq!(drain_by_peeking(r.as_fd()), Drained::Quiet);
        let (pipe_r, pipe_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        assert!(ring_doorbell(&w)); // plain bytes first, then bytes with a descriptor
        let raw = [pipe_w.as_raw_fd()];
        let iov = [std::io::IoSlice::new(&[1u8; 8])];
        sendmsg::<()>(w.as_raw_fd(), &iov, &[ControlMessage::ScmRights(&raw)], MsgFlags::empty(), None)
            .unwrap();
        drop(pipe_w);
        // (A peek that spans plain bytes and then a message with descriptors sees those.)
        assert_eq!(drain_by_peeking(r.as_fd()), Drained::Descriptors);
        assert_eq!(drain_by_peeking(r.as_fd()), Drained::Descriptors, "left queued");
        let eof = |fd: &OwnedFd| {
            let mut p = [nix::poll::PollFd::new(fd.as_fd(), nix::poll::PollFlags::POLLIN)];
            nix::poll::poll(&mut p, nix::poll::PollTimeout::ZERO).unwrap() > 0
        };
        assert!(!eof(&pipe_r), "the descriptor sent was closed by the drain");
        // Closed for good only with the doorbell's last descriptor.
        drop(r);
        assert!(eof(&pipe_r));
        // Where the kernel refuses descriptors, a doorbell's ringer cannot send any.
        if crate::transport::descriptors_refusable() {
            let (r, w) = doorbell().unwrap();
            let (_pr, pw) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
            let raw = [pw.as_raw_fd()];
            let sent = sendmsg::<()>(
                w.as_raw_fd(),
                &iov,
                &[ControlMessage::ScmRights(&raw)],
                MsgFlags::empty(),
                None,
            );
            assert_eq!(sent, Err(nix::Error::EPERM));
            assert_eq!(drain_untrusted_doorbell(&r), Drained::Quiet);
        }
    }

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
