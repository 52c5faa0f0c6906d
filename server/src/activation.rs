//! systemd socket activation: the listening socket handed over by the service manager
//! (`LISTEN_PID`, `LISTEN_FDS`, the sockets from fd 3 on; see sd_listen_fds(3)).
//!
//! With a `.socket` unit, the socket outlives the broker: clients that connect while the broker
//! restarts wait in its backlog instead of finding no socket at all.

use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{getsockopt, sockopt, SockType};

/// The first descriptor passed by the service manager.
const FIRST_FD: RawFd = 3;

/// A listening socket the service manager passed that is not one nvmed can serve.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_FDS` is not a number, or more than one socket was passed.
    #[error("socket activation: LISTEN_FDS={0:?}: nvmed takes exactly one socket")]
    Count(String),
    /// The passed descriptor is not a listening Unix SOCK_SEQPACKET socket.
    #[error("socket activation: fd 3 is not a listening SOCK_SEQPACKET socket ({0}); use ListenSequentialPacket= in the .socket unit")]
    NotSeqPacket(String),
}

/// Takes the socket the service manager passed to this process, if it passed one. Call it
/// once, early (before other threads exist); it clears `LISTEN_PID`, `LISTEN_FDS` and
/// `LISTEN_FDNAMES` so children do not inherit them.
pub fn take_listener() -> Result<Option<OwnedFd>, ActivationError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    if pid.and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
        return Ok(None);
    }
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: called once at start, before any other thread exists (see the docs above), so
        // nothing reads the environment concurrently.
        unsafe { std::env::remove_var(v) };
    }
    let fds = fds.unwrap_or_default();
    match fds.parse::<u32>() {
        Ok(0) => return Ok(None),
        Ok(1) => {}
        _ => return Err(ActivationError::Count(fds)),
    }
    // SAFETY: the service manager passed fd 3 to this process (LISTEN_PID is ours) and nothing
    // else in the process owns it; it is owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(FIRST_FD) };
    let kind = getsockopt(&fd.as_fd(), sockopt::SockType)
        .map_err(|e| ActivationError::NotSeqPacket(e.to_string()))?;
    let listening = getsockopt(&fd.as_fd(), sockopt::AcceptConn)
        .map_err(|e| ActivationError::NotSeqPacket(e.to_string()))?;
    if kind != SockType::SeqPacket || !listening {
        return Err(ActivationError::NotSeqPacket(format!("type {kind:?}, listening {listening}")));
    }
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
        .map_err(|e| ActivationError::NotSeqPacket(e.to_string()))?;
    Ok(Some(fd))
}
