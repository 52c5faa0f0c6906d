//! Sending and receiving control datagrams with attached file descriptors.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::control::{MAX_FDS_PER_MESSAGE, MAX_MESSAGE_SIZE};

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
            Err(nix::Error::EPIPE) | Err(nix::Error::ECONNRESET) => return Err(TransportError::Closed),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one datagram, taking ownership of any descriptors (MSG_CMSG_CLOEXEC).
pub fn recv(sock: BorrowedFd<'_>) -> Result<Received, TransportError> {
    let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
    let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
    loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
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
        let mut fds = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(list) = c {
                    // SAFETY: SCM_RIGHTS gave this process new descriptors that nothing else owns.
                    fds.extend(list.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
        }
        let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
        let fds_truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        let len = msg.bytes;
        if len == 0 && fds.is_empty() && !truncated {
            return Err(TransportError::Closed);
        }
        buf.truncate(len.min(MAX_MESSAGE_SIZE));
        return Ok(Received { bytes: buf, fds, truncated, fds_truncated });
    }
}
