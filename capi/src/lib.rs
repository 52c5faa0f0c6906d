//! # libnvmed: the C API of nvmed
//!
//! A small C API over [`nvmed_client`]: open a ring on the broker's socket, register memfd
//! buffers, prepare reads, writes, flushes, write-zeroes, deallocates and vectored requests,
//! submit them, and poll or wait for their completions. The header `include/nvmed.h` is
//! generated from this crate by cbindgen (the `header` test fails when it is stale).
//!
//! Conventions, for every function:
//! - Functions return an `int`: zero or a count on success, a negative `NVMED_E_*` code on
//!   failure. `nvmed_strerror(code)` names the code; `nvmed_last_error()` has the full text of
//!   the calling thread's last failure (the broker's own words when it refused something).
//! - Handles (`nvmed_ring`) are opaque; one handle is used by one thread at a time (give each
//!   thread its own ring, as with the Rust library).
//! - No Rust panic unwinds into C: a panic is caught and returned as `NVMED_E_PANIC`, and the
//!   ring it happened on is poisoned (every later call but `nvmed_close` fails). Builds with
//!   `panic = "abort"` (the workspace's release profile) abort the process instead.
//!
//! Buffers: `nvmed_buffer_alloc` creates and registers a sealed memfd and returns its address
//! in this process; `nvmed_buffer_register_memfd` registers part of a memfd the caller already
//! has (sealed with `F_SEAL_SHRINK`). The device moves data straight to and from that memory:
//! do not touch a range while a request using it is in flight.

// C names for C types, and C functions that take a request's fields as arguments.
#![allow(non_camel_case_types, clippy::too_many_arguments)]

mod ffi;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_void, CString};
use std::time::Duration;

use nvmed_client::{
    BufferId, Completion, Error, Io, IoSegment, MemfdBuffer, NamespaceInfo, NvmeRing, RingOptions, Status,
    MAX_SEGMENTS,
};

/// Major version of the library (semantic versioning; 0.x: the minor version breaks).
pub const NVMED_VERSION_MAJOR: u32 = 0;
/// Minor version of the library.
pub const NVMED_VERSION_MINOR: u32 = 1;
/// Patch version of the library.
pub const NVMED_VERSION_PATCH: u32 = 0;

/// A completion's status word: 0 is success; otherwise its top byte says whose status it is,
/// `NVMED_STATUS_KIND_NVME` (the device's: bits 0-7 SC, 8-10 SCT, 15 DNR) or
/// `NVMED_STATUS_KIND_BROKER` (nvmed's own: one of the `NVMED_STATUS_*` words below).
/// `nvmed_status_string` describes any of them.
pub const NVMED_STATUS_SUCCESS: u32 = 0;
/// The top byte (`status >> 24`) of a device status.
pub const NVMED_STATUS_KIND_NVME: u32 = 1;
/// The top byte (`status >> 24`) of a broker status.
pub const NVMED_STATUS_KIND_BROKER: u32 = 2;
/// Broker status: the opcode is not one nvmed knows.
pub const NVMED_STATUS_INVALID_OPCODE: u32 = (2 << 24) | 1;
/// Broker status: unknown flags or non-zero reserved fields.
pub const NVMED_STATUS_INVALID_FIELD: u32 = (2 << 24) | 2;
/// Broker status: the namespace is not one this client may use.
pub const NVMED_STATUS_INVALID_NAMESPACE: u32 = (2 << 24) | 3;
/// Broker status: the buffer id is not registered by this client.
pub const NVMED_STATUS_BAD_BUFFER: u32 = (2 << 24) | 4;
/// Broker status: the range lies outside the registered buffer.
pub const NVMED_STATUS_BUFFER_RANGE: u32 = (2 << 24) | 5;
/// Broker status: past the end of the namespace (or the client's window).
pub const NVMED_STATUS_OUT_OF_RANGE: u32 = (2 << 24) | 6;
/// Broker status: offset or length not a multiple of the block size.
pub const NVMED_STATUS_MISALIGNED: u32 = (2 << 24) | 7;
/// Broker status: a data request of length zero.
pub const NVMED_STATUS_ZERO_LENGTH: u32 = (2 << 24) | 8;
/// Broker status: longer than the namespace's largest request.
pub const NVMED_STATUS_TOO_LARGE: u32 = (2 << 24) | 9;
/// Broker status: not allowed for this client (a read-only grant).
pub const NVMED_STATUS_NOT_PERMITTED: u32 = (2 << 24) | 10;
/// Broker status: aborted by a controller reset.
pub const NVMED_STATUS_DEVICE_RESET: u32 = (2 << 24) | 11;
/// Broker status: the controller failed.
pub const NVMED_STATUS_DEVICE_FAULT: u32 = (2 << 24) | 12;
/// Broker status: a vectored request's segment count.
pub const NVMED_STATUS_BAD_SEGMENT_COUNT: u32 = (2 << 24) | 13;
/// Broker status: a vectored request's segment list placement.
pub const NVMED_STATUS_SEGMENT_LIST_RANGE: u32 = (2 << 24) | 14;
/// Broker status: a vectored request's segment lengths.
pub const NVMED_STATUS_SEGMENT_LENGTH: u32 = (2 << 24) | 15;
/// Broker status: the controller is gone.
pub const NVMED_STATUS_DEVICE_GONE: u32 = (2 << 24) | 16;
/// Library status: the session ended for good (the broker went away, no reconnecting) before
/// the request completed; the device no longer uses its buffers.
pub const NVMED_STATUS_SESSION_ENDED: u32 = (2 << 24) | 17;

/// Bytes of segment list a vectored request uses per segment (at `list_offset` of its list
/// buffer; the wire format's entry, larger than `nvmed_segment`).
pub const NVMED_SEGMENT_LIST_ENTRY_SIZE: u32 = 24;
const _: () = assert!(NVMED_SEGMENT_LIST_ENTRY_SIZE as u64 == nvmed_client::SEGMENT_SIZE);

// The header's version macros are the crate's version.
const _: () = {
    assert!(const_u32(env!("CARGO_PKG_VERSION_MAJOR")) == NVMED_VERSION_MAJOR);
    assert!(const_u32(env!("CARGO_PKG_VERSION_MINOR")) == NVMED_VERSION_MINOR);
    assert!(const_u32(env!("CARGO_PKG_VERSION_PATCH")) == NVMED_VERSION_PATCH);
};

const fn const_u32(s: &str) -> u32 {
    let b = s.as_bytes();
    let mut v = 0;
    let mut i = 0;
    while i < b.len() {
        v = v * 10 + (b[i] - b'0') as u32;
        i += 1;
    }
    v
}

/// Success.
pub const NVMED_OK: c_int = 0;
/// An argument is invalid (a NULL pointer, a length out of range, a bad option).
pub const NVMED_E_INVAL: c_int = -1;
/// Connecting to the broker's socket failed.
pub const NVMED_E_CONNECT: c_int = -2;
/// The broker refused the request (a limit, a permission, a bad buffer); see `nvmed_last_error`.
pub const NVMED_E_REFUSED: c_int = -3;
/// The broker broke the protocol.
pub const NVMED_E_PROTOCOL: c_int = -4;
/// The broker closed the connection (it exited or was killed).
pub const NVMED_E_BROKER_GONE: c_int = -5;
/// The broker stopped serving this ring.
pub const NVMED_E_RING_FAULTED: c_int = -6;
/// A system call failed.
pub const NVMED_E_OS: c_int = -7;
/// The submission queue is full: submit and reap completions first.
pub const NVMED_E_SQ_FULL: c_int = -8;
/// No such buffer registered by this ring.
pub const NVMED_E_UNKNOWN_BUFFER: c_int = -9;
/// The range lies outside its buffer.
pub const NVMED_E_OUT_OF_BUFFER: c_int = -10;
/// The buffer (range) is in use by I/O in flight.
pub const NVMED_E_IN_FLIGHT: c_int = -11;
/// A vectored request's segments are not sound.
pub const NVMED_E_BAD_SEGMENTS: c_int = -12;
/// A request failed (its status is in `nvmed_last_error`).
pub const NVMED_E_IO: c_int = -13;
/// A wait timed out before any completion.
pub const NVMED_E_TIMEOUT: c_int = -14;
/// The namespace id is not one this session may use.
pub const NVMED_E_NO_NAMESPACE: c_int = -15;
/// An internal error (a caught panic); the ring is no longer usable: close it. Only a library
/// built with `panic = "unwind"` returns it: the release build (`panic = "abort"`, as the
/// workspace builds it) aborts the process on a panic instead (capi/README.md).
pub const NVMED_E_PANIC: c_int = -16;
/// The ring reconnected to a restarted broker: its completion doorbell is a new one. Call
/// `nvmed_completion_fd` again (and watch that one) before arming again.
pub const NVMED_E_FD_CHANGED: c_int = -17;

/// `nvmed_prep_write` / `nvmed_prep_write_zeroes` flag: force unit access.
pub const NVMED_PREP_FUA: u32 = 1;

/// Options of `nvmed_open`; fill with `nvmed_ring_opts_init` first, then change fields.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nvmed_ring_opts {
    /// Submission queue entries (power of two; default 256).
    pub sq_entries: u32,
    /// Completion queue entries (power of two, at least `sq_entries`; default 512).
    pub cq_entries: u32,
    /// Longest `nvmed_wait` spins before sleeping on the completion doorbell, in microseconds
    /// (default 50; 0 sleeps at once).
    pub spin_us: u32,
    /// Broker I/O thread to serve the ring, or -1 for the least loaded (default).
    pub io_thread: i32,
    /// Name shown in the broker's logs and `nvmectl sessions` (NULL: the program's name).
    pub client_name: *const c_char,
}

/// A namespace this session may use.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct nvmed_namespace {
    /// Namespace id for the `nvmed_prep_*` calls.
    pub nsid: u32,
    /// Logical block size in bytes: offsets and lengths are multiples of it.
    pub lba_size: u32,
    /// Number of logical blocks.
    pub lba_count: u64,
    /// Capacity in bytes.
    pub size_bytes: u64,
    /// Largest single read or write in bytes.
    pub max_transfer: u32,
    /// 1 when this client may only read.
    pub read_only: u32,
    /// Index of the controller it lives on.
    pub controller: u32,
    /// Its namespace id on that controller.
    pub controller_nsid: u32,
}

/// A registered buffer.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nvmed_buffer {
    /// Buffer id for the `nvmed_prep_*` calls.
    pub id: u32,
    /// Zero.
    pub reserved: u32,
    /// Length in bytes.
    pub len: u64,
    /// Its address in this process.
    pub addr: *mut c_void,
}

/// One piece of a vectored request: `len` bytes at `offset` of registered buffer `buf_id`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct nvmed_segment {
    /// The buffer.
    pub buf_id: u32,
    /// Length in bytes (at least 1).
    pub len: u32,
    /// Byte offset inside the buffer.
    pub offset: u64,
}

/// A finished request.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct nvmed_completion {
    /// The request's `user_data`.
    pub user_data: u64,
    /// 0 on success, else the status word (`nvmed_status_string` describes it).
    pub status: u32,
    /// Bytes transferred.
    pub result: u32,
}

/// Counters of the session (all its rings) and of the broker.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct nvmed_stats {
    /// Requests the broker took off this session's rings.
    pub submitted: u64,
    /// Completions posted to this session.
    pub completed: u64,
    /// Completions with an error status.
    pub errors: u64,
    /// Bytes read by successful reads.
    pub bytes_read: u64,
    /// Bytes written by successful writes.
    pub bytes_written: u64,
    /// Requests of this session at the device now.
    pub in_flight: u64,
    /// Buffers this session registered.
    pub buffers: u64,
    /// Bytes this session registered.
    pub buffer_bytes: u64,
    /// Bytes of vectored requests copied through the broker's bounce buffers.
    pub bounced_bytes: u64,
    /// Rings of this session.
    pub rings: u64,
    /// Sessions connected to the broker (0 unless the caller is an operator: root, the
    /// broker's own uid, or a member of its admin group; others learn nothing of other tenants).
    pub broker_sessions: u64,
}

// A ring may move between threads (one at a time), as the header promises.
const _: () = {
    const fn send<T: Send>() {}
    send::<nvmed_ring>();
};

// The layouts C sees (the header repeats these as static assertions).
const _: () = {
    assert!(size_of::<nvmed_namespace>() == 40);
    assert!(size_of::<nvmed_segment>() == 16);
    assert!(size_of::<nvmed_completion>() == 16);
    assert!(size_of::<nvmed_stats>() == 88);
    assert!(size_of::<nvmed_buffer>() == 16 + size_of::<usize>());
    assert!(size_of::<nvmed_ring_opts>() == 16 + size_of::<usize>());
};

/// An open ring (opaque to C).
pub struct nvmed_ring {
    ring: NvmeRing,
    /// Completions taken from the ring and not yet handed out (a wait may reap more than the
    /// caller's array holds).
    done: VecDeque<Completion>,
    scratch: Vec<Completion>,
    namespaces: Vec<NamespaceInfo>,
    /// A panic happened in a call on this ring.
    poisoned: bool,
    /// The connection epoch when `nvmed_completion_fd` last gave the caller the doorbell.
    fd_epoch: Option<u64>,
}

/// A failed call: its code and the text `nvmed_last_error` returns.
#[derive(Debug)]
pub(crate) struct Failure {
    code: c_int,
    message: String,
}

impl Failure {
    fn inval(message: impl Into<String>) -> Self {
        Self { code: NVMED_E_INVAL, message: message.into() }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::Connect { .. } => NVMED_E_CONNECT,
            Error::Refused(_) => NVMED_E_REFUSED,
            Error::Protocol(_) => NVMED_E_PROTOCOL,
            Error::BrokerGone => NVMED_E_BROKER_GONE,
            Error::RingFaulted(_) => NVMED_E_RING_FAULTED,
            Error::Os { .. } => NVMED_E_OS,
            Error::SqFull => NVMED_E_SQ_FULL,
            Error::UnknownBuffer(_) => NVMED_E_UNKNOWN_BUFFER,
            Error::OutOfBuffer { .. } => NVMED_E_OUT_OF_BUFFER,
            Error::InFlight { .. } => NVMED_E_IN_FLIGHT,
            Error::BadSegments(_) => NVMED_E_BAD_SEGMENTS,
            Error::NoBuffer | Error::ForeignBuffer(_) | Error::WaitBeyondOutstanding { .. } => NVMED_E_INVAL,
            // Not reachable from C (no shared buffers, requests of at most 4 GiB - 1, no idle-ring
            // calls, no tokio driver), but named so that a new kind needs a decision here.
            Error::SharedBuffer(_) | Error::TooLong { .. } | Error::RingBusy(_) => NVMED_E_INVAL,
            Error::DriverGone => NVMED_E_BROKER_GONE,
            Error::Io(_) => NVMED_E_IO,
            Error::Timeout => NVMED_E_TIMEOUT,
            // The broker is gone and did not come back within the reconnect budget.
            Error::ReconnectFailed { .. } => NVMED_E_BROKER_GONE,
        };
        Self { code, message: e.to_string() }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records a failure for `nvmed_last_error` and returns its code.
pub(crate) fn fail(f: Failure) -> c_int {
    let text = CString::new(f.message.replace('\0', " ")).unwrap_or_default();
    // (During the thread's teardown the slot is gone: the code alone then.)
    let _ = LAST_ERROR.try_with(|l| *l.borrow_mut() = text);
    f.code
}

type R<T> = Result<T, Failure>;

impl nvmed_ring {
    fn usable(&mut self) -> R<&mut Self> {
        if self.poisoned {
            return Err(Failure {
                code: NVMED_E_PANIC,
                message: "the ring is unusable after an internal error; close it".into(),
            });
        }
        Ok(self)
    }

    fn check_nsid(&self, nsid: u32) -> R<()> {
        if self.namespaces.iter().any(|n| n.nsid == nsid) {
            return Ok(());
        }
        let have: Vec<String> = self.namespaces.iter().map(|n| n.nsid.to_string()).collect();
        Err(Failure {
            code: NVMED_E_NO_NAMESPACE,
            message: format!(
                "namespace {nsid} is not one this session may use (it may use: {})",
                if have.is_empty() { "none".to_string() } else { have.join(", ") }
            ),
        })
    }

    fn prep(&mut self, io: Io) -> R<i32> {
        self.check_nsid(io.nsid)?;
        self.ring.prep(io)?;
        Ok(0)
    }

    fn prep_vectored(
        &mut self,
        write: bool,
        nsid: u32,
        offset: u64,
        segs: &[nvmed_segment],
        list_buf: u32,
        list_offset: u64,
        user_data: u64,
    ) -> R<i32> {
        self.check_nsid(nsid)?;
        if segs.is_empty() || segs.len() > usize::from(MAX_SEGMENTS) {
            return Err(Failure {
                code: NVMED_E_BAD_SEGMENTS,
                message: format!("{} segments (1 to {MAX_SEGMENTS} allowed)", segs.len()),
            });
        }
        let segs: Vec<IoSegment> =
            segs.iter().map(|s| IoSegment::new(BufferId(s.buf_id), s.offset, s.len)).collect();
        let list = BufferId(list_buf);
        if write {
            self.ring.prep_writev(nsid, offset, &segs, list, list_offset, user_data)?;
        } else {
            self.ring.prep_readv(nsid, offset, &segs, list, list_offset, user_data)?;
        }
        Ok(0)
    }

    /// Moves up to `out.len()` completions (buffered first, then from the ring) into `out`.
    fn hand_out(&mut self, out: &mut [nvmed_completion]) -> usize {
        let n = out.len().min(self.done.len());
        for (slot, c) in out.iter_mut().zip(self.done.drain(..n)) {
            *slot = nvmed_completion { user_data: c.user_data, status: c.status.encode(), result: c.result };
        }
        n
    }

    fn poll(&mut self, out: &mut [nvmed_completion]) -> R<i32> {
        if self.done.len() < out.len() {
            self.scratch.clear();
            let r = self.ring.poll(&mut self.scratch);
            // What was reaped before a failure (a reconnect that failed) is handed out first.
            self.done.extend(self.scratch.drain(..));
            if let Err(e) = r {
                if self.done.is_empty() {
                    return Err(e.into());
                }
            }
        }
        Ok(self.hand_out(out) as i32)
    }

    fn wait(&mut self, out: &mut [nvmed_completion], min: usize, timeout: Option<Duration>) -> R<i32> {
        let min = min.min(out.len());
        if self.done.len() < min {
            self.scratch.clear();
            let r = self.ring.wait(min - self.done.len(), &mut self.scratch, timeout);
            self.done.extend(self.scratch.drain(..));
            match r {
                // Some completions came before the timeout or the failure: hand those out (a
                // failure repeats at the next call).
                Err(_) if !self.done.is_empty() => {}
                Err(e) => return Err(e.into()),
                Ok(_) => {}
            }
        } else if self.done.len() < out.len() {
            return self.poll(out);
        }
        Ok(self.hand_out(out) as i32)
    }
}

fn buffer_out(ring: &mut nvmed_ring, mem: MemfdBuffer, out: *mut nvmed_buffer) -> R<i32> {
    let addr = mem.as_ptr().cast::<c_void>();
    let len = mem.len() as u64;
    let id = ring.ring.register_buffer(mem)?;
    let b = nvmed_buffer { id: id.0, reserved: 0, len, addr };
    // SAFETY: `out` was checked non-null by the caller of this helper; the C caller promised it
    // is writable.
    if let Err(e) = unsafe { ffi::put(out, b, "the buffer out-pointer") } {
        let _ = ring.ring.unregister_buffer(id);
        return Err(e);
    }
    Ok(0)
}

// ---------------------------------------------------------------------------------------------
// The C API.

/// The library's version, `(major << 16) | (minor << 8) | patch`: compare with
/// `NVMED_VERSION` from the header to catch a header/library mismatch.
#[no_mangle]
pub extern "C" fn nvmed_version() -> u32 {
    (NVMED_VERSION_MAJOR << 16) | (NVMED_VERSION_MINOR << 8) | NVMED_VERSION_PATCH
}

/// A short description of an `NVMED_E_*` code (a static string; never NULL).
#[no_mangle]
pub extern "C" fn nvmed_strerror(code: c_int) -> *const c_char {
    let s: &'static std::ffi::CStr = match code {
        NVMED_OK => c"success",
        NVMED_E_INVAL => c"invalid argument",
        NVMED_E_CONNECT => c"cannot connect to the broker",
        NVMED_E_REFUSED => c"the broker refused the request",
        NVMED_E_PROTOCOL => c"protocol violation by the broker",
        NVMED_E_BROKER_GONE => c"the broker closed the connection",
        NVMED_E_RING_FAULTED => c"the broker stopped serving this ring",
        NVMED_E_OS => c"a system call failed",
        NVMED_E_SQ_FULL => c"submission queue full",
        NVMED_E_UNKNOWN_BUFFER => c"unknown buffer id",
        NVMED_E_OUT_OF_BUFFER => c"range outside the buffer",
        NVMED_E_IN_FLIGHT => c"buffer range in use by I/O in flight",
        NVMED_E_BAD_SEGMENTS => c"bad segment list",
        NVMED_E_IO => c"I/O failed",
        NVMED_E_TIMEOUT => c"timed out",
        NVMED_E_NO_NAMESPACE => c"no such namespace for this session",
        NVMED_E_PANIC => c"internal error in libnvmed",
        NVMED_E_FD_CHANGED => c"the ring reconnected: its completion fd changed",
        _ => c"unknown nvmed error code",
    };
    s.as_ptr()
}

/// The full text of the calling thread's last failed call (the broker's own words when it
/// refused something). Valid until the next failing call on this thread; "" when none failed.
#[no_mangle]
pub extern "C" fn nvmed_last_error() -> *const c_char {
    // The CString lives in this thread's slot until the next failure replaces it (during the
    // thread's teardown the slot is gone: a static text then).
    LAST_ERROR.try_with(|l| l.borrow().as_ptr()).unwrap_or(c"".as_ptr())
}

/// Describes a completion's status word into `buf` (`len` bytes, NUL-terminated, truncated as
/// snprintf does). Returns the length of the whole description.
///
/// # Safety
/// `buf` is valid for writing `len` bytes (or `len` is 0).
#[no_mangle]
pub unsafe extern "C" fn nvmed_status_string(status: u32, buf: *mut c_char, len: usize) -> c_int {
    ffi::guard(None, || {
        let text = Status::decode(status).to_string();
        // SAFETY: the caller's promise about `buf`.
        let n = unsafe { ffi::copy_text(&text, buf, len) }?;
        Ok(n as i32)
    })
}

/// Fills `opts` with the defaults.
///
/// # Safety
/// `opts` is valid for writing an `nvmed_ring_opts`.
#[no_mangle]
pub unsafe extern "C" fn nvmed_ring_opts_init(opts: *mut nvmed_ring_opts) -> c_int {
    ffi::guard(None, || {
        let d = RingOptions::default();
        let o = nvmed_ring_opts {
            sq_entries: d.sq_entries,
            cq_entries: d.cq_entries,
            spin_us: d.spin.as_micros() as u32,
            io_thread: -1,
            client_name: std::ptr::null(),
        };
        // SAFETY: the caller's promise about `opts`.
        unsafe { ffi::put(opts, o, "opts") }?;
        Ok(0)
    })
}

/// Connects to the broker at socket `path`, opens a session and its first ring, and stores the
/// handle in `*out`. `opts` may be NULL for the defaults.
///
/// # Safety
/// `path` is a NUL-terminated string; `opts` is NULL or a valid `nvmed_ring_opts` (whose
/// `client_name` is NULL or NUL-terminated); `out` is valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn nvmed_open(
    path: *const c_char,
    opts: *const nvmed_ring_opts,
    out: *mut *mut nvmed_ring,
) -> c_int {
    ffi::guard(None, || {
        if out.is_null() {
            return Err(Failure::inval("the handle out-pointer is NULL"));
        }
        // SAFETY: the caller's promise about `path`.
        let path = unsafe { ffi::path_arg(path, "the socket path") }?;
        let mut ro = RingOptions::default();
        // SAFETY: the caller's promise about `opts`.
        if let Some(o) = unsafe { ffi::opt_in(opts) } {
            ro.sq_entries = o.sq_entries;
            ro.cq_entries = o.cq_entries;
            ro.spin = Duration::from_micros(u64::from(o.spin_us));
            ro.thread = match o.io_thread {
                -1 => None,
                t => Some(u16::try_from(t).map_err(|_| Failure::inval(format!("io_thread {t} is invalid")))?),
            };
            if !o.client_name.is_null() {
                // SAFETY: the caller's promise about `client_name`.
                // A display name: bytes that are not UTF-8 (a name cut mid-character) are
                // replaced, not refused.
                ro.client_name = unsafe { ffi::str_arg_lossy(o.client_name, "client_name") }?;
            }
        }
        let ring = NvmeRing::open_with(&path, ro)?;
        let namespaces = ring.namespaces().to_vec();
        let handle = Box::new(nvmed_ring {
            ring,
            done: VecDeque::new(),
            scratch: Vec::new(),
            namespaces,
            poisoned: false,
            fd_epoch: None,
        });
        // SAFETY: checked non-null; the caller promised it is writable.
        unsafe { ffi::put(out, Box::into_raw(handle), "out") }?;
        Ok(0)
    })
}

/// Closes the ring and its session (the broker lets its I/O drain and releases its buffers).
/// Buffer addresses of the ring are invalid afterwards. NULL is ignored. It does not wait for
/// requests still in flight: the device may write into a registered memfd of the caller's for
/// a moment after this returns, so wait for their completions first if that memory is reused.
///
/// # Safety
/// `ring` is NULL or a handle from `nvmed_open` not closed yet; it is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn nvmed_close(ring: *mut nvmed_ring) {
    if ring.is_null() {
        return;
    }
    // SAFETY: the handle came from `Box::into_raw` in `nvmed_open` and the caller gives it up.
    let handle = unsafe { Box::from_raw(ring) };
    // Dropping talks to the broker; a panic in it must not unwind into C either.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(handle)));
}

/// Number of namespaces this session may use.
///
/// # Safety
/// `ring` is a live handle (see `nvmed_open`), used by this thread only.
#[no_mangle]
pub unsafe extern "C" fn nvmed_namespace_count(ring: *mut nvmed_ring) -> c_int {
    ffi::guard(Some(ring), || {
        // SAFETY: the caller's promise about `ring`.
        let r = unsafe { ffi::ring(ring) }?.usable()?;
        Ok(r.namespaces.len() as i32)
    })
}

/// Describes the `index`th namespace (0 <= index < `nvmed_namespace_count`) into `*out`.
///
/// # Safety
/// `ring` is a live handle; `out` is valid for writing an `nvmed_namespace`.
#[no_mangle]
pub unsafe extern "C" fn nvmed_namespace_get(
    ring: *mut nvmed_ring,
    index: u32,
    out: *mut nvmed_namespace,
) -> c_int {
    ffi::guard(Some(ring), || {
        // SAFETY: the caller's promise about `ring`.
        let r = unsafe { ffi::ring(ring) }?.usable()?;
        let n = r.namespaces.get(index as usize).ok_or_else(|| {
            Failure::inval(format!("namespace index {index} (this session has {})", r.namespaces.len()))
        })?;
        let info = nvmed_namespace {
            nsid: n.nsid,
            lba_size: n.lba_size,
            lba_count: n.lba_count,
            size_bytes: n.size_bytes(),
            max_transfer: n.max_transfer,
            read_only: u32::from(n.read_only),
            controller: u32::from(n.controller),
            controller_nsid: n.controller_nsid,
        };
        // SAFETY: the caller's promise about `out`.
        unsafe { ffi::put(out, info, "out") }?;
        Ok(0)
    })
}

/// Creates a zeroed, sealed memfd buffer of `len` bytes (rounded up to 4 KiB), maps it,
/// registers it with the broker and describes it in `*out`.
///
/// # Safety
/// `ring` is a live handle; `out` is valid for writing an `nvmed_buffer`.
#[no_mangle]
pub unsafe extern "C" fn nvmed_buffer_alloc(
    ring: *mut nvmed_ring,
    len: usize,
    out: *mut nvmed_buffer,
) -> c_int {
    ffi::guard(Some(ring), || {
        // SAFETY: the caller's promise about `ring`.
        let r = unsafe { ffi::ring(ring) }?.usable()?;
        if out.is_null() {
            return Err(Failure::inval("the buffer out-pointer is NULL"));
        }
        if len == 0 {
            return Err(Failure::inval("buffer length 0"));
        }
        if len.checked_next_multiple_of(4096).is_none() {
            return Err(Failure::inval(format!("buffer length {len} is too large")));
        }
        let mem = MemfdBuffer::new(len)?;
        buffer_out(r, mem, out)
    })
}

/// Registers `len` bytes at `offset` (a multiple of 4096) of the caller's memfd `fd`, which must
/// be sealed with `F_SEAL_SHRINK` (the broker checks). The library maps that range and keeps a
/// duplicate of `fd`; the caller may close its own. `*out` describes the buffer (`addr` is the
/// library's mapping of the range: the same memory as any mapping of the caller's).
///
/// # Safety
/// `ring` is a live handle; `fd` is an open file descriptor; `out` is valid for writing an
/// `nvmed_buffer`.
#[no_mangle]
pub unsafe extern "C" fn nvmed_buffer_register_memfd(
    ring: *mut nvmed_ring,
    fd: c_int,
    offset: u64,
    len: usize,
    out: *mut nvmed_buffer,
) -> c_int {
    ffi::guard(Some(ring), || {
        // SAFETY: the caller's promise about `ring`.
        let r = unsafe { ffi::ring(ring) }?.usable()?;
        if out.is_null() {
            return Err(Failure::inval("the buffer out-pointer is NULL"));
        }
        if len == 0 || !offset.is_multiple_of(4096) {
            return Err(Failure::inval(format!(
                "buffer of {len} bytes at offset {offset} (the length must be above 0, the offset a multiple of 4096)"
            )));
        }
        // SAFETY: the caller promises `fd` is open.
        let fd = unsafe { ffi::dup_fd(fd) }?;
        let mem = MemfdBuffer::from_sealed_memfd_range(fd, offset, len)?;
        buffer_out(r, mem, out)
    })
}

/// Unregisters a buffer with no I/O in flight and unmaps it.
///
/// # Safety
/// `ring` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn nvmed_buffer_unregister(ring: *mut nvmed_ring, buf_id: u32) -> c_int {
    ffi::guard(Some(ring), || {
        // SAFETY: the caller's promise about `ring`.
        let r = unsafe { ffi::ring(ring) }?.usable()?;
        r.ring.unregister_buffer(BufferId(buf_id))?;
        Ok(0)
    })
}

/// Queues a read of `len` bytes at byte `offset` of namespace `nsid` into buffer `buf_id` at
/// `buf_offset`. Nothing reaches the broker before `nvmed_submit`.
///
/// # Safety
/// `ring` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn nvmed_prep_read(
    ring: *mut nvmed_ring,
    nsid: u32,
    offset: u64,
    len: u32,
    buf_id: u32,
    buf_offset: u64,
    user_data: u64,
) -> c_int {
    ffi::guard(Some(ring), || {
        // SAFETY: the caller's promise about `ring`.
        let r = unsafe { ffi::ring(ring) }?.usable()?;
        r.prep(Io::read(nsid, offset, len, BufferId(buf_id), buf_offset).user_data(user_data))
    })
}

/// Queues a write of `len` bytes at byte `offset` of namespace `nsid` from buffer `buf_id` at
/// `buf_offset`. `flags`: 0 or `NVMED_PREP_FUA`.
///
/// # Safety
/// `ring` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn nvmed_prep_write(
    ring: *mut nvmed_ring,
    nsid: u32,
    offset: u64,
    len: u32,
    buf_id: u32,
    buf_offset: u64,
    user_data: u64,
    flags: u32,
) -> c_int {
    ffi::guard(Some(ring), || {
        // SAFETY: the caller's promise about `ring`.
        let r = unsafe { ffi::ring(ring) }?.usable()?;
        let io = with_flags(Io::write(nsid, offset, len, BufferId(buf_id), buf_offset), flags)?;
        r.prep(io.user_data(user_data))
    })
}

fn with_flags(io: Io, flags: u32) -> R<Io> {
    if flags & !NVMED_PREP_FUA != 0 {
        return Err(Failure::inval(format!("unknown flags {flags:#x}")));
    }
    Ok(if flags & NVMED_PREP_FUA != 0 { io.fua() } else { io })
}

/// Queues a flush of namespace `nsid`.
///
/// # Safety
/// `ring` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn nvmed_prep_flush(ring: *mut nvmed_ring, nsid: u32, user_data: u64) -> c_int {
    ffi::guard(Some(ring), || {
        // SAFETY: the caller's promise about `ring`.
        let r = unsafe { ffi::ring(ring) }?.usable()?;
        r.prep(Io::flush(nsid).user_data(user_data))
    })
}

/// Queues a write-zeroes of `len` bytes at byte `offset`. `flags`: 0 or `NVMED_PREP_FUA`.
///
/// # Safety
/// `ring` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn nvmed_prep_write_zeroes(
    ring: *mut nvmed_ring,
    nsid: u32,
    offset: u64,
    len: u32,
    user_data: u64,
    flags: u32,
) -> c_int {
    ffi::guard(Some(ring), || {
        // SAFETY: the caller's promise about `ring`.
        let r = unsafe { ffi::ring(ring) }?.usable()?;
        let io = with_flags(Io::write_zeroes(nsid, offset, len), flags)?;
        r.prep(io.user_data(user_data))
    })
}

/// Queues a deallocate (trim, discard) of `len` bytes at byte `offset`.
///
/// # Safety
/// `ring` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn nvmed_prep_deallocate(
    ring: *mut nvmed_ring,
    nsid: u32,
    offset: u64,
    len: u32,
    user_data: u64,
) -> c_int {
    ffi::guard(Some(ring), || {
        // SAFETY: the caller's promise about `ring`.
        let r = unsafe { ffi::ring(ring) }?.usable()?;
        r.prep(Io::deallocate(nsid, offset, len).user_data(user_data))
    })
}

/// Queues a vectored read of the segments' total length at byte `offset` into the `count`
/// segments (at most 256, any length and alignment, in any registered buffers). The library
/// writes the segment list, `count * NVMED_SEGMENT_LIST_ENTRY_SIZE` (24) bytes, at
/// `list_offset` (8-byte aligned) of buffer `list_buf`, which must be this ring's; that range
/// stays in use until the completion, and must not overlap the request's segments
/// (`NVMED_E_BAD_SEGMENTS`).
///
/// # Safety
/// `ring` is a live handle; `segs` is valid for reading `count` `nvmed_segment`s.
#[no_mangle]
pub unsafe extern "C" fn nvmed_prep_readv(
    ring: *mut nvmed_ring,
    nsid: u32,
    offset: u64,
    segs: *const nvmed_segment,
    count: u32,
    list_buf: u32,
    list_offset: u64,
    user_data: u64,
) -> c_int {
    ffi::guard(Some(ring), || {
        // SAFETY: the caller's promise about `ring`.
        let r = unsafe { ffi::ring(ring) }?.usable()?;
        // SAFETY: the caller's promise about `segs`.
        let segs = unsafe { ffi::slice_in(segs, count as usize, "segs") }?;
        r.prep_vectored(false, nsid, offset, segs, list_buf, list_offset, user_data)
    })
}

/// As `nvmed_prep_readv`, for a vectored write from the segments.
///
/// # Safety
/// `ring` is a live handle; `segs` is valid for reading `count` `nvmed_segment`s.
#[no_mangle]
pub unsafe extern "C" fn nvmed_prep_writev(
    ring: *mut nvmed_ring,
    nsid: u32,
    offset: u64,
    segs: *const nvmed_segment,
    count: u32,
    list_buf: u32,
    list_offset: u64,
    user_data: u64,
) -> c_int {
    ffi::guard(Some(ring), || {
        // SAFETY: the caller's promise about `ring`.
        let r = unsafe { ffi::ring(ring) }?.usable()?;
        // SAFETY: the caller's promise about `segs`.
        let segs = unsafe { ffi::slice_in(segs, count as usize, "segs") }?;
        r.prep_vectored(true, nsid, offset, segs, list_buf, list_offset, user_data)
    })
}

/// Publishes the queued requests to the broker (waking it if it sleeps). Returns how many.
///
/// # Safety
/// `ring` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn nvmed_submit(ring: *mut nvmed_ring) -> c_int {
    ffi::guard(Some(ring), || {
        // SAFETY: the caller's promise about `ring`.
        let r = unsafe { ffi::ring(ring) }?.usable()?;
        Ok(r.ring.submit()? as i32)
    })
}

/// Moves up to `max` finished requests into `out` without blocking. Returns how many.
///
/// # Safety
/// `ring` is a live handle; `out` is valid for writing `max` `nvmed_completion`s.
#[no_mangle]
pub unsafe extern "C" fn nvmed_poll(ring: *mut nvmed_ring, out: *mut nvmed_completion, max: u32) -> c_int {
    ffi::guard(Some(ring), || {
        // SAFETY: the caller's promise about `ring`.
        let r = unsafe { ffi::ring(ring) }?.usable()?;
        // SAFETY: the caller's promise about `out`.
        let out = unsafe { ffi::slice_out(out, max as usize, "out") }?;
        r.poll(out)
    })
}

/// Waits until at least `min` (at most `max`) finished requests were moved into `out`: spins
/// briefly, then sleeps on the completion doorbell. `timeout_us` < 0 waits forever. Returns how
/// many; fewer than `min` only when the timeout passed after some arrived (none:
/// `NVMED_E_TIMEOUT`), or when the ring failed after some arrived (they are returned first; the
/// failure is returned by the next call). Asking for more than can come (requests submitted and
/// not yet reaped) fails at once with `NVMED_E_INVAL` instead of waiting for nothing.
///
/// # Safety
/// `ring` is a live handle; `out` is valid for writing `max` `nvmed_completion`s.
#[no_mangle]
pub unsafe extern "C" fn nvmed_wait(
    ring: *mut nvmed_ring,
    out: *mut nvmed_completion,
    max: u32,
    min: u32,
    timeout_us: i64,
) -> c_int {
    ffi::guard(Some(ring), || {
        // SAFETY: the caller's promise about `ring`.
        let r = unsafe { ffi::ring(ring) }?.usable()?;
        // SAFETY: the caller's promise about `out`.
        let out = unsafe { ffi::slice_out(out, max as usize, "out") }?;
        let timeout = u64::try_from(timeout_us).ok().map(Duration::from_micros);
        r.wait(out, min as usize, timeout)
    })
}

/// The ring's completion doorbell, for callers that sleep in their own event loop: see
/// `nvmed_arm_completion_fd`. The descriptor belongs to the ring.
///
/// # Safety
/// `ring` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn nvmed_completion_fd(ring: *mut nvmed_ring) -> c_int {
    ffi::guard(Some(ring), || {
        use std::os::fd::AsRawFd;
        // SAFETY: the caller's promise about `ring`.
        let r = unsafe { ffi::ring(ring) }?.usable()?;
        r.fd_epoch = Some(r.ring.connection_epoch());
        Ok(r.ring.completion_fd().as_raw_fd())
    })
}

/// The ring's control socket, for event loops that sleep on the completion doorbell: a broker
/// that exits writes no doorbell, but this socket then reports a hang-up (poll for `POLLRDHUP`
/// or `POLLHUP`; never read or write it). On a hang-up call `nvmed_arm_completion_fd`, which
/// reconnects to a restarted broker (`NVMED_E_FD_CHANGED`: take both descriptors again) or
/// fails with `NVMED_E_BROKER_GONE`. The descriptor belongs to the ring.
///
/// # Safety
/// `ring` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn nvmed_control_fd(ring: *mut nvmed_ring) -> c_int {
    ffi::guard(Some(ring), || {
        use std::os::fd::AsRawFd;
        // SAFETY: the caller's promise about `ring`.
        let r = unsafe { ffi::ring(ring) }?.usable()?;
        r.fd_epoch = Some(r.ring.connection_epoch());
        Ok(r.ring.control_socket().as_raw_fd())
    })
}

/// Asks the broker to signal the completion doorbell at the next completion, then polls once
/// more into `out` (up to `max`, at least 1). Returns how many completions it moved: 0 means the
/// caller may sleep until the fd is readable and must then call `nvmed_disarm_completion_fd`;
/// above 0 the ring is disarmed again and the caller handles them instead of sleeping. A broker
/// that exited is noticed here: the ring reconnects to a restarted one (its requests in flight
/// are sent again) and, if the caller took the doorbell with `nvmed_completion_fd`, this returns
/// `NVMED_E_FD_CHANGED` (take it again), or fails with `NVMED_E_BROKER_GONE`.
///
/// # Safety
/// `ring` is a live handle; `out` is valid for writing `max` `nvmed_completion`s.
#[no_mangle]
pub unsafe extern "C" fn nvmed_arm_completion_fd(
    ring: *mut nvmed_ring,
    out: *mut nvmed_completion,
    max: u32,
) -> c_int {
    ffi::guard(Some(ring), || {
        // SAFETY: the caller's promise about `ring`.
        let r = unsafe { ffi::ring(ring) }?.usable()?;
        // SAFETY: the caller's promise about `out`.
        let out = unsafe { ffi::slice_out(out, max as usize, "out") }?;
        if out.is_empty() {
            return Err(Failure::inval("max is 0: no room for the completions arming may find"));
        }
        if !r.done.is_empty() {
            return Ok(r.hand_out(out) as i32);
        }
        r.scratch.clear();
        // A broker that exited sets no flag the ring sees, and its doorbell would never be
        // written: reconnect (or fail) instead of arming a sleep nothing ends.
        let res = if r.ring.broker_closed() {
            r.ring.reconnect(&mut r.scratch)
        } else {
            r.ring.arm_completion_fd(&mut r.scratch)
        };
        r.done.extend(r.scratch.drain(..));
        if let Err(e) = res {
            if r.done.is_empty() {
                return Err(e.into());
            }
        }
        if !r.done.is_empty() {
            return Ok(r.hand_out(out) as i32);
        }
        if r.fd_epoch.is_some_and(|e| e != r.ring.connection_epoch()) {
            return Err(Failure {
                code: NVMED_E_FD_CHANGED,
                message: "the ring reconnected to a restarted broker: call nvmed_completion_fd (and nvmed_control_fd) \
                          again; the old descriptor numbers may now be other files"
                    .into(),
            });
        }
        Ok(0)
    })
}

/// Ends a sleep begun with `nvmed_arm_completion_fd` (empties the doorbell, stops the broker's
/// wakeups). Poll afterwards.
///
/// # Safety
/// `ring` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn nvmed_disarm_completion_fd(ring: *mut nvmed_ring) -> c_int {
    ffi::guard(Some(ring), || {
        // SAFETY: the caller's promise about `ring`.
        let r = unsafe { ffi::ring(ring) }?.usable()?;
        r.ring.disarm_completion_fd();
        Ok(0)
    })
}

/// Requests queued or submitted and not yet handed out as completions.
///
/// # Safety
/// `ring` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn nvmed_in_flight(ring: *mut nvmed_ring) -> c_int {
    ffi::guard(Some(ring), || {
        // SAFETY: the caller's promise about `ring`.
        let r = unsafe { ffi::ring(ring) }?.usable()?;
        Ok((r.ring.in_flight() + r.done.len()) as i32)
    })
}

/// Free submission queue slots.
///
/// # Safety
/// `ring` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn nvmed_sq_space(ring: *mut nvmed_ring) -> c_int {
    ffi::guard(Some(ring), || {
        // SAFETY: the caller's promise about `ring`.
        let r = unsafe { ffi::ring(ring) }?.usable()?;
        Ok(r.ring.sq_space() as i32)
    })
}

/// Reads the session's and the broker's counters into `*out` (a round trip to the broker).
///
/// # Safety
/// `ring` is a live handle; `out` is valid for writing an `nvmed_stats`.
#[no_mangle]
pub unsafe extern "C" fn nvmed_stats_get(ring: *mut nvmed_ring, out: *mut nvmed_stats) -> c_int {
    ffi::guard(Some(ring), || {
        // SAFETY: the caller's promise about `ring`.
        let r = unsafe { ffi::ring(ring) }?.usable()?;
        if out.is_null() {
            return Err(Failure::inval("the stats out-pointer is NULL"));
        }
        let s = r.ring.stats()?;
        let st = nvmed_stats {
            submitted: s.submitted,
            completed: s.completed,
            errors: s.errors,
            bytes_read: s.bytes_read,
            bytes_written: s.bytes_written,
            in_flight: s.in_flight,
            buffers: s.buffers,
            buffer_bytes: s.buffer_bytes,
            bounced_bytes: s.bounced_bytes,
            rings: s.rings,
            broker_sessions: s.broker_sessions,
        };
        // SAFETY: the caller's promise about `out`.
        unsafe { ffi::put(out, st, "out") }?;
        Ok(0)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn status_constants_are_the_protocols_encodings() {
        use nvmed_client::{BrokerStatus as B, Status as S};
        let all = [
            (NVMED_STATUS_INVALID_OPCODE, B::InvalidOpcode),
            (NVMED_STATUS_INVALID_FIELD, B::InvalidField),
            (NVMED_STATUS_INVALID_NAMESPACE, B::InvalidNamespace),
            (NVMED_STATUS_BAD_BUFFER, B::BadBuffer),
            (NVMED_STATUS_BUFFER_RANGE, B::BufferRange),
            (NVMED_STATUS_OUT_OF_RANGE, B::OutOfRange),
            (NVMED_STATUS_MISALIGNED, B::Misaligned),
            (NVMED_STATUS_ZERO_LENGTH, B::ZeroLength),
            (NVMED_STATUS_TOO_LARGE, B::TooLarge),
            (NVMED_STATUS_NOT_PERMITTED, B::NotPermitted),
            (NVMED_STATUS_DEVICE_RESET, B::DeviceReset),
            (NVMED_STATUS_DEVICE_FAULT, B::DeviceFault),
            (NVMED_STATUS_BAD_SEGMENT_COUNT, B::BadSegmentCount),
            (NVMED_STATUS_SEGMENT_LIST_RANGE, B::SegmentListRange),
            (NVMED_STATUS_SEGMENT_LENGTH, B::SegmentLength),
            (NVMED_STATUS_DEVICE_GONE, B::DeviceGone),
            (NVMED_STATUS_SESSION_ENDED, B::SessionEnded),
        ];
        for (word, b) in all {
            assert_eq!(word, S::Broker(b).encode(), "{b:?}");
            assert_eq!(word >> 24, NVMED_STATUS_KIND_BROKER);
        }
        assert_eq!(S::Success.encode(), NVMED_STATUS_SUCCESS);
    }

    use super::*;
    use std::ffi::CStr;

    fn last() -> String {
        // SAFETY: nvmed_last_error returns a valid NUL-terminated string of this thread.
        unsafe { CStr::from_ptr(nvmed_last_error()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn a_panic_becomes_an_error_code_and_poisons_nothing_else() {
        let code = ffi::guard(None, || panic!("boom {}", 42));
        assert_eq!(code, NVMED_E_PANIC);
        assert!(last().contains("boom 42"), "{}", last());
    }

    #[test]
    fn null_pointers_are_invalid_arguments() {
        // SAFETY: NULL handles and pointers are what is being tested; the library checks them.
        unsafe {
            assert_eq!(nvmed_submit(std::ptr::null_mut()), NVMED_E_INVAL);
            assert!(last().contains("NULL"));
            let mut out = std::ptr::null_mut();
            assert_eq!(nvmed_open(std::ptr::null(), std::ptr::null(), &mut out), NVMED_E_INVAL);
            assert_eq!(
                nvmed_open(c"/nonexistent/nvmed.sock".as_ptr(), std::ptr::null(), &mut out),
                NVMED_E_CONNECT
            );
            assert!(last().contains("/nonexistent/nvmed.sock"), "{}", last());
            assert!(out.is_null());
            nvmed_close(std::ptr::null_mut());
        }
    }

    #[test]
    fn every_code_has_a_description_and_statuses_are_described() {
        for code in NVMED_E_PANIC..=NVMED_OK {
            // SAFETY: nvmed_strerror returns static NUL-terminated strings.
            let s = unsafe { CStr::from_ptr(nvmed_strerror(code)) }.to_str().unwrap();
            assert!(!s.is_empty() && s != "unknown nvmed error code", "code {code}");
        }
        let word = Status::Broker(nvmed_client::BrokerStatus::NotPermitted).encode();
        let mut buf = [0 as c_char; 16];
        // SAFETY: `buf` has room for its length.
        let n = unsafe { nvmed_status_string(word, buf.as_mut_ptr(), buf.len()) };
        // SAFETY: nvmed_status_string NUL-terminates within the buffer.
        let short = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap();
        assert_eq!(short.len(), 15);
        assert!(n as usize > short.len(), "the whole length is returned");
        assert_eq!(nvmed_version() >> 16, NVMED_VERSION_MAJOR);
    }
}
