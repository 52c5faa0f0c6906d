//! Sending and receiving control datagrams with attached file descriptors.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::control::MAX_MESSAGE_SIZE;

/// A received datagram.
#[derive(Debug)]
pub struct Received {
    /// The payload (at most [`MAX_MESSAGE_SIZE`] bytes).
    pub bytes: Vec<u8>,
    /// File descriptors that arrived with it (close-on-exec).
    pub fds: Vec<OwnedFd>,
    /// The payload was longer than [`MAX_MESSAGE_SIZE`] and was cut.
    pub truncated: bool,
    /// More descriptors were sent than fit; the extra ones were closed by the kernel.
    pub fds_truncated: bool,
}

/// Transport failures.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The peer closed the connection.
    #[error("connection closed by peer")]
    Closed,
    /// A socket call failed.
    #[error("socket error: {0}")]
    Io(#[from] nix::Error),
}

/// Sends one datagram with optional descriptors.
pub fn send(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), TransportError> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage<'_>> =
        if raw.is_empty() { Vec::new() } else { vec![ControlMessage::ScmRights(&raw)] };
    let iov = [IoSlice::new(bytes)];
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(nix::Error::EINTR) => continue,
            // (Older kernels answer a send that races the peer's close with ECONNREFUSED, and
            // ENOTCONN after it.)
            Err(
                nix::Error::EPIPE | nix::Error::ECONNRESET | nix::Error::ECONNREFUSED | nix::Error::ENOTCONN,
            ) => return Err(TransportError::Closed),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The kernel's limit on descriptors in one message (`SCM_MAX_FD`).
pub const SCM_MAX_FD: usize = 253;

/// Receives one datagram, taking ownership of any descriptors (MSG_CMSG_CLOEXEC).
///
/// The control buffer has room for every descriptor the kernel can attach to one message, and
/// every descriptor that arrived is owned by the result (and so closed when it is dropped), on
/// every path: a peer cannot make this process keep descriptors by sending too many.
pub fn recv(sock: BorrowedFd<'_>) -> Result<Received, TransportError> {
    recv_with_room(sock, SCM_MAX_FD, MAX_MESSAGE_SIZE)
}

/// [`recv`] with room for only `max_fds` descriptors (and one more, so that a message carrying
/// more is seen as cut: `fds_truncated`). The kernel closes the descriptors that do not fit
/// instead of installing them, so a peer cannot make this process hold hundreds of descriptors
/// per message, even for a moment.
pub fn recv_at_most_fds(sock: BorrowedFd<'_>, max_fds: usize) -> Result<Received, TransportError> {
    recv_with_room(sock, max_fds + 1, MAX_MESSAGE_SIZE)
}

/// [`recv`] for datagrams of up to `max_bytes` (the admin socket's replies are larger than
/// control messages); `truncated` then refers to `max_bytes`.
pub fn recv_sized(sock: BorrowedFd<'_>, max_bytes: usize) -> Result<Received, TransportError> {
    recv_with_room(sock, SCM_MAX_FD, max_bytes)
}

/// [`recv`] with control-message room for `fd_room` descriptors.
fn recv_with_room(
    sock: BorrowedFd<'_>,
    fd_room: usize,
    max_bytes: usize,
) -> Result<Received, TransportError> {
    let mut buf = vec![0u8; max_bytes];
    // SAFETY: CMSG_SPACE only computes a size.
    let room = unsafe { libc::CMSG_SPACE((fd_room * size_of::<RawFd>()) as libc::c_uint) } as usize;
    let mut cmsg_space = vec![0u8; room];
    loop {
        cmsg_space.fill(0);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let (len, flags, parsed) = {
            let msg = match recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg_space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::ECONNRESET) => return Err(TransportError::Closed),
                Err(e) => return Err(e.into()),
            };
            // nix refuses to iterate control data the kernel cut (MSG_CTRUNC); the descriptors
            // that did fit were installed all the same, so they are found by hand below.
            let parsed = msg.cmsgs().ok().map(|cmsgs| {
                let mut fds = Vec::new();
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(list) = c {
                        // SAFETY: SCM_RIGHTS gave this process new descriptors nothing else owns.
                        fds.extend(list.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                    }
                }
                fds
            });
            (msg.bytes, msg.flags, parsed)
        };
        let fds = match parsed {
            Some(fds) => fds,
            None => scm_rights_in(&cmsg_space),
        };
        let truncated = flags.contains(MsgFlags::MSG_TRUNC);
        let fds_truncated = flags.contains(MsgFlags::MSG_CTRUNC);
        if len == 0 && fds.is_empty() && !truncated && peer_closed(sock) {
            return Err(TransportError::Closed);
        }
        buf.truncate(len.min(max_bytes));
        return Ok(Received { bytes: buf, fds, truncated, fds_truncated });
    }
}

/// Whether the socket's peer is gone or its reading side shut down (POLLRDHUP, POLLHUP or
/// POLLERR now; a failed poll counts as gone): on SOCK_SEQPACKET a zero-length read is either
/// that or an empty datagram, and queued data does not hide it.
pub fn peer_closed(sock: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let rdhup = PollFlags::from_bits_retain(libc::POLLRDHUP);
    let mut fds = [PollFd::new(sock, rdhup)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => {
            fds[0].revents().is_none_or(|r| r.intersects(rdhup | PollFlags::POLLHUP | PollFlags::POLLERR))
        }
        Err(_) => true,
    }
}

/// Socket option numbers the libc crate does not offer yet, where they are the asm-generic ones
/// (x86, arm, riscv, loongarch, s390x); architectures with their own numbering (sparc, mips,
/// parisc, alpha, powerpc) get none, and the callers do without.
mod sockopt_numbers {
    const GENERIC: bool = cfg!(any(
        target_arch = "x86_64",
        target_arch = "x86",
        target_arch = "aarch64",
        target_arch = "arm",
        target_arch = "riscv64",
        target_arch = "loongarch64",
        target_arch = "s390x"
    ));
    /// `SO_PASSRIGHTS` (Linux 6.16+): whether a Unix socket takes descriptors sent to it.
    pub const PASSRIGHTS: Option<libc::c_int> = if GENERIC { Some(83) } else { None };
    /// `SO_PEERGROUPS` (Linux 4.13+): the peer's supplementary groups at connect time.
    pub const PEERGROUPS: Option<libc::c_int> = if GENERIC { Some(59) } else { None };
}

/// Makes a Unix socket refuse (`accept: false`) or take again descriptors its peer sends: a
/// sender's `sendmsg` with SCM_RIGHTS then fails with EPERM, so nothing the peer could send
/// is ever closed by this process. Sockets a listener accepts inherit its setting. Needs
/// Linux 6.16 or later: older kernels answer ENOPROTOOPT and nothing changes.
///
/// Why it matters: when a descriptor another process sent is dropped unread, the kernel closes
/// it in the receiving thread, and closing some files takes as long as their sender likes (a
/// TCP socket with `SO_LINGER` and unsent data, a file on a FUSE mount it serves).
pub fn accept_descriptors(sock: BorrowedFd<'_>, accept: bool) -> std::io::Result<()> {
    let Some(option) = sockopt_numbers::PASSRIGHTS else {
        return Err(std::io::Error::from_raw_os_error(libc::ENOPROTOOPT));
    };
    let value = libc::c_int::from(accept);
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `value`, a live local.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The supplementary groups the peer of a Unix socket had when it connected (SO_PEERGROUPS,
/// Linux 4.13+): recorded by the kernel, so never another process's (a pid's /proc entry read
/// later may belong to a new process). `None` where the kernel or the architecture does not
/// say.
pub fn peer_groups(sock: BorrowedFd<'_>) -> Option<Vec<u32>> {
    let option = sockopt_numbers::PEERGROUPS?;
    let mut groups = vec![0u32; 64];
    loop {
        let mut len = (groups.len() * size_of::<u32>()) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `groups`, which holds that many.
        let rc = unsafe {
            libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, option, groups.as_mut_ptr().cast(), &mut len)
        };
        if rc == 0 {
            groups.truncate(len as usize / size_of::<u32>());
            return Some(groups);
        }
        // ERANGE: `len` now says how much room the list needs (at most NGROUPS_MAX, 65536).
        let need = len as usize / size_of::<u32>();
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE)
            || need <= groups.len()
            || need > 65536
        {
            return None;
        }
        groups.resize(need, 0);
    }
}

/// Whether this kernel lets a Unix socket refuse descriptors ([`accept_descriptors`]).
/// `NVMED_TEST_NO_PASSRIGHTS=1` in the environment says no whatever the kernel (to test what
/// older kernels get).
pub fn descriptors_refusable() -> bool {
    static REFUSABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REFUSABLE.get_or_init(|| {
        if std::env::var_os("NVMED_TEST_NO_PASSRIGHTS").is_some_and(|v| v == "1") {
            return false;
        }
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC)
            .is_ok_and(|(a, _b)| accept_descriptors(std::os::fd::AsFd::as_fd(&a), false).is_ok())
    })
}

/// Takes ownership of every descriptor in the SCM_RIGHTS messages of a (possibly truncated)
/// control buffer that the kernel filled and that was zeroed before.
fn scm_rights_in(control: &[u8]) -> Vec<OwnedFd> {
    let header = size_of::<libc::cmsghdr>();
    // SAFETY: CMSG_LEN only computes a size.
    let data_start = unsafe { libc::CMSG_LEN(0) } as usize;
    let align = size_of::<usize>();
    let mut fds = Vec::new();
    let mut off = 0;
    while off + header <= control.len() {
        // SAFETY: `off + header` is inside the buffer (checked); the header is plain integers,
        // and an unaligned read accepts any position.
        let h: libc::cmsghdr = unsafe { std::ptr::read_unaligned(control.as_ptr().add(off).cast()) };
        let len = h.cmsg_len as usize;
        if len < data_start {
            break; // zeroed space: no more messages
        }
        let end = off.saturating_add(len).min(control.len());
        if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
            for raw in control[off + data_start..end].chunks_exact(size_of::<RawFd>()) {
                let fd = RawFd::from_ne_bytes(raw.try_into().expect("chunk of 4 bytes"));
                if fd >= 0 {
                    // SAFETY: the kernel installed this descriptor for this message; nothing
                    // else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        off = off.saturating_add(len.next_multiple_of(align));
    }
    fds
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_beyond_the_room_are_all_closed() {
        let (a, b) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
        // Every copy of the pipe's write end is sent; once all are closed, the read end sees EOF.
        let (r, w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK).unwrap();
        for _ in 0..50 {
            let fds = [w.as_fd(); 6];
            send(a.as_fd(), b"x", &fds).unwrap();
            // Room for 2: the kernel installs 2 and cuts the rest; both must be owned.
            let got = recv_with_room(b.as_fd(), 2, MAX_MESSAGE_SIZE).unwrap();
            assert!(got.fds_truncated);
            assert_eq!(got.fds.len(), 2);
            assert_eq!(got.bytes, b"x");
        }
        // With the default room nothing is cut.
        send(a.as_fd(), b"y", &[w.as_fd(); 6]).unwrap();
        let got = recv(b.as_fd()).unwrap();
        assert!(!got.fds_truncated);
        assert_eq!(got.fds.len(), 6);
        drop(got);
        drop(w);
        let mut byte = [0u8; 1];
        assert_eq!(nix::unistd::read(&r, &mut byte), Ok(0), "a received copy of the write end is still open");
    }

    #[test]
    fn a_socket_can_refuse_descriptors_where_the_kernel_allows() {
        let (a, b) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
        let (_r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        if !descriptors_refusable() {
            assert!(accept_descriptors(b.as_fd(), false).is_err());
            return; // a kernel before 6.16: nothing to test
        }
        accept_descriptors(b.as_fd(), false).unwrap();
        assert!(matches!(send(a.as_fd(), b"x", &[w.as_fd()]), Err(TransportError::Io(nix::Error::EPERM))));
        send(a.as_fd(), b"y", &[]).unwrap(); // plain data still goes
        assert_eq!(recv(b.as_fd()).unwrap().bytes, b"y");
        accept_descriptors(b.as_fd(), true).unwrap();
        send(a.as_fd(), b"z", &[w.as_fd()]).unwrap();
        assert_eq!(recv(b.as_fd()).unwrap().fds.len(), 1);
    }

    #[test]
    fn a_peers_groups_come_from_the_socket() {
        let (a, _b) =
            socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC).unwrap();
        let mut got = peer_groups(a.as_fd()).expect("SO_PEERGROUPS (Linux 4.13+)");
        let mut mine: Vec<u32> = nix::unistd::getgroups().unwrap().iter().map(|g| g.as_raw()).collect();
        got.sort_unstable();
        mine.sort_unstable();
        assert_eq!(got, mine);
    }

    #[test]
    fn empty_datagram_is_not_a_close() {
        let (a, b) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
        send(a.as_fd(), b"", &[]).unwrap();
        let got = recv(b.as_fd()).unwrap();
        assert!(got.bytes.is_empty());
        drop(a);
        assert!(matches!(recv(b.as_fd()), Err(TransportError::Closed)));
    }
}
