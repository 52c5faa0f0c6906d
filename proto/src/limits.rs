//! The process's own resource limits, shared by the broker and the daemons that serve clients.

/// Raises this process's soft limit on open files to its hard limit and returns the limit now
/// in force; `None` if the limits cannot be read.
pub fn raise_fd_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}
