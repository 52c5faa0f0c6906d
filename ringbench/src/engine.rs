//! I/O engines: the same workload through nvmed or through the kernel's io_uring.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use io_uring::{opcode, types, IoUring};
use nvmed_client::{BufferId, Io, NvmeRing, NvmeSession, RingOptions, SharedBuffer};

/// Engine failures.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The nvmed client failed.
    #[error("nvmed: {0}")]
    Nvmed(#[from] nvmed_client::Error),
    /// A system call failed.
    #[error("{0}")]
    Os(#[from] std::io::Error),
    /// An I/O completed with an error.
    #[error("I/O failed: {0}")]
    Failed(String),
}

/// One completed slot: its index and whether it succeeded.
pub type Done = (usize, Result<(), String>);

/// An I/O engine with `iodepth` slots of `bs` bytes each.
pub trait Engine {
    /// Whether the engine moves data (nop engines do not).
    fn moves_data(&self) -> bool {
        true
    }
    /// The slot's memory; only called while no I/O on the slot is in flight.
    fn slot_mut(&mut self, slot: usize) -> &mut [u8];
    /// Queues an I/O for `slot`.
    fn queue(&mut self, slot: usize, write: bool, offset: u64) -> Result<(), EngineError>;
    /// Makes queued I/O visible to the device / broker.
    fn submit(&mut self) -> Result<(), EngineError>;
    /// Waits for at least `min` completions.
    fn reap(&mut self, min: usize, out: &mut Vec<Done>) -> Result<(), EngineError>;
    /// Times the engine connected again to a restarted broker.
    fn reconnects(&self) -> u64 {
        0
    }
}

/// nvmed through the client library (reads/writes, or broker no-ops).
pub struct NvmedEngine {
    ring: NvmeRing,
    buf: BufferId,
    /// Where this job's slots start in `buf`.
    base: u64,
    /// The job's slice of a buffer shared by every job of the session (if it is one).
    shared: Option<SharedBuffer>,
    nsid: u32,
    /// Bytes of that namespace.
    ns_bytes: u64,
    bs: u32,
    nop: bool,
    done: Vec<nvmed_client::Completion>,
}

/// The namespace `nsid` (or the first) among those the broker lists.
fn pick(ring: &NvmeRing, nsid: Option<u32>) -> Result<(u32, u64), EngineError> {
    let list = ring.namespaces();
    let ns = match nsid {
        Some(id) => list.iter().find(|n| n.nsid == id),
        None => list.first(),
    };
    let ns = ns.ok_or_else(|| {
        let ids: Vec<u32> = list.iter().map(|n| n.nsid).collect();
        EngineError::Failed(format!("no namespace {nsid:?} among those granted: {ids:?}"))
    })?;
    Ok((ns.nsid, ns.size_bytes()))
}

/// Ring options for a job of `iodepth`: an SQ that holds the depth, and a CQ with room to
/// spare (twice the SQ, at least 64 entries, as io_uring's CQ is twice its SQ): the broker
/// reads the client's CQ head only when its cached view of the CQ says there is not room for
/// a batch, so a CQ just the depth's size would cost a read of the client's line (a
/// cross-core miss) every batch, or every other request at QD1.
fn ring_options(iodepth: usize, spin_us: u64) -> RingOptions {
    let entries = (iodepth as u32).next_power_of_two().max(2);
    RingOptions {
        sq_entries: entries,
        cq_entries: (entries * 2).max(64), // --iodepth <= 4096: at most 8192, the largest CQ
        client_name: "ringbench".into(),
        spin: std::time::Duration::from_micros(spin_us),
        thread: None,
        ..Default::default()
    }
}

impl NvmedEngine {
    /// Opens a session of its own with a ring deep enough for `iodepth`, and registers a buffer.
    pub fn open(
        socket: &Path,
        nsid: Option<u32>,
        iodepth: usize,
        bs: u32,
        nop: bool,
        spin_us: u64,
    ) -> Result<Self, EngineError> {
        let mut ring = NvmeRing::open_with(socket, ring_options(iodepth, spin_us))?;
        let (nsid, ns_bytes) = pick(&ring, nsid)?;
        let buf = ring.alloc_buffer(iodepth * bs as usize)?;
        Ok(Self { ring, buf, base: 0, shared: None, nsid, ns_bytes, bs, nop, done: Vec::new() })
    }

    /// A new ring of `session` (on the broker's least loaded I/O thread) whose slots are
    /// `iodepth * bs` bytes at `base` of `shared`, a buffer all jobs of the session share.
    #[allow(clippy::too_many_arguments)]
    pub fn on_session(
        session: &NvmeSession,
        nsid: Option<u32>,
        shared: &SharedBuffer,
        base: u64,
        iodepth: usize,
        bs: u32,
        nop: bool,
        spin_us: u64,
    ) -> Result<Self, EngineError> {
        let ring = session.new_ring_with(ring_options(iodepth, spin_us))?;
        let (nsid, ns_bytes) = pick(&ring, nsid)?;
        let end = base + (iodepth * bs as usize) as u64;
        if end > shared.len() as u64 {
            return Err(EngineError::Failed(format!("shared buffer too small: {end} > {}", shared.len())));
        }
        Ok(Self {
            ring,
            buf: shared.id(),
            base,
            shared: Some(shared.clone()),
            nsid,
            ns_bytes,
            bs,
            nop,
            done: Vec::new(),
        })
    }

    /// The namespace size in bytes.
    pub fn namespace_bytes(&self) -> u64 {
        self.ns_bytes
    }

    /// The broker's pid (from SO_PEERCRED of the control socket).
    pub fn broker_pid(&self) -> Option<i32> {
        nix::sys::socket::getsockopt(&self.ring.control_socket(), nix::sys::socket::sockopt::PeerCredentials)
            .ok()
            .map(|c| c.pid())
    }

    fn slot_offset(&self, slot: usize) -> u64 {
        self.base + slot as u64 * u64::from(self.bs)
    }
}

impl Engine for NvmedEngine {
    fn moves_data(&self) -> bool {
        !self.nop
    }
    fn slot_mut(&mut self, slot: usize) -> &mut [u8] {
        let (at, bs) = (self.slot_offset(slot), self.bs as usize);
        match &self.shared {
            Some(shared) => {
                assert!(at as usize + bs <= shared.len());
                // SAFETY: in bounds (asserted). The slot is this job's alone (jobs get disjoint
                // ranges of the shared buffer), no I/O on it is in flight (the Engine contract),
                // and the borrow of `self` keeps this job from using the slot meanwhile.
                unsafe { std::slice::from_raw_parts_mut(shared.as_ptr().add(at as usize), bs) }
            }
            None => self.ring.buffer_mut(self.buf, at, bs as u64).expect("slot has no I/O in flight"),
        }
    }
    fn queue(&mut self, slot: usize, write: bool, offset: u64) -> Result<(), EngineError> {
        let io = if self.nop {
            Io::nop()
        } else if write {
            Io::write(self.nsid, offset, self.bs, self.buf, self.slot_offset(slot))
        } else {
            Io::read(self.nsid, offset, self.bs, self.buf, self.slot_offset(slot))
        };
        self.ring.prep(io.user_data(slot as u64))?;
        Ok(())
    }
    fn submit(&mut self) -> Result<(), EngineError> {
        self.ring.submit()?;
        Ok(())
    }
    fn reconnects(&self) -> u64 {
        self.ring.reconnects()
    }
    fn reap(&mut self, min: usize, out: &mut Vec<Done>) -> Result<(), EngineError> {
        self.done.clear();
        self.ring.wait(min, &mut self.done, None)?;
        out.extend(self.done.iter().map(|c| {
            (c.user_data as usize, if c.status.is_success() { Ok(()) } else { Err(c.status.to_string()) })
        }));
        Ok(())
    }
}

/// Page-aligned memory for io_uring's registered buffer.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: the allocation is owned by this value; moving it to another thread moves ownership.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Self { ptr, layout }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// The kernel path: io_uring with O_DIRECT, a registered file and a registered buffer
/// (or NOPs, for the ring's own overhead).
pub struct UringEngine {
    // Declared first: the ring (and the kernel's use of the buffer) goes before the buffer.
    ring: IoUring,
    _file: Option<OwnedFd>,
    buf: AlignedBuf,
    bs: usize,
    nop: bool,
}

impl UringEngine {
    /// Opens `path` with O_DIRECT (ignored for NOPs) and sets up the ring.
    pub fn open(path: Option<&Path>, iodepth: usize, bs: usize, nop: bool) -> Result<Self, EngineError> {
        let ring = IoUring::builder().build((iodepth as u32).next_power_of_two().max(2))?;
        let buf = AlignedBuf::new(iodepth * bs);
        let mut file = None;
        if !nop {
            use std::os::unix::fs::OpenOptionsExt;
            let path = path.ok_or(EngineError::Failed("the io_uring engine needs --filename".into()))?;
            let f =
                std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path)?;
            let fd: OwnedFd = f.into();
            ring.submitter().register_files(&[fd.as_raw_fd()])?;
            let iov = libc::iovec { iov_base: buf.ptr.cast(), iov_len: buf.layout.size() };
            // SAFETY: the buffer outlives the ring (field order) and is only handed to the
            // kernel for slots with I/O in flight.
            unsafe { ring.submitter().register_buffers(&[iov])? };
            file = Some(fd);
        }
        Ok(Self { ring, _file: file, buf, bs, nop })
    }
}

impl Engine for UringEngine {
    fn moves_data(&self) -> bool {
        !self.nop
    }
    fn slot_mut(&mut self, slot: usize) -> &mut [u8] {
        assert!((slot + 1) * self.bs <= self.buf.layout.size());
        // SAFETY: in bounds (asserted), and the caller only asks for slots with no I/O in
        // flight, so the kernel does not touch this range while the slice lives.
        unsafe { std::slice::from_raw_parts_mut(self.buf.ptr.add(slot * self.bs), self.bs) }
    }
    fn queue(&mut self, slot: usize, write: bool, offset: u64) -> Result<(), EngineError> {
        let entry = if self.nop {
            opcode::Nop::new().build()
        } else {
            // SAFETY: `slot * bs` lies inside the registered buffer (checked in slot_mut's assert
            // at setup time: iodepth * bs bytes were allocated).
            let ptr = unsafe { self.buf.ptr.add(slot * self.bs) };
            if write {
                opcode::WriteFixed::new(types::Fixed(0), ptr, self.bs as u32, 0).offset(offset).build()
            } else {
                opcode::ReadFixed::new(types::Fixed(0), ptr, self.bs as u32, 0).offset(offset).build()
            }
        };
        // SAFETY: the entry points into the registered buffer, which outlives the ring.
        unsafe { self.ring.submission().push(&entry.user_data(slot as u64)) }
            .map_err(|_| EngineError::Failed("io_uring SQ full".into()))
    }
    fn submit(&mut self) -> Result<(), EngineError> {
        self.ring.submit()?;
        Ok(())
    }
    fn reap(&mut self, min: usize, out: &mut Vec<Done>) -> Result<(), EngineError> {
        let (nop, bs) = (self.nop, self.bs);
        reap_ring(&mut self.ring, min, out, |r| match r {
            r if r < 0 => Err(std::io::Error::from_raw_os_error(-r).to_string()),
            r if !nop && r as usize != bs => Err(format!("short transfer of {r} bytes")),
            _ => Ok(()),
        })
    }
}

/// Waits for at least `min` completions of an io_uring and hands them out as slot results.
fn reap_ring<S: io_uring::squeue::EntryMarker, C: io_uring::cqueue::EntryMarker>(
    ring: &mut IoUring<S, C>,
    min: usize,
    out: &mut Vec<Done>,
    interpret: impl Fn(i32) -> Result<(), String>,
) -> Result<(), EngineError> {
    let mut got = 0;
    while got < min {
        ring.submit_and_wait(min - got)?;
        for cqe in ring.completion() {
            let cqe: io_uring::cqueue::Entry = cqe.into();
            out.push((cqe.user_data() as usize, interpret(cqe.result())));
            got += 1;
        }
    }
    Ok(())
}

/// NVMe passthrough through io_uring (`IORING_OP_URING_CMD` on /dev/ngXnY): the kernel's
/// fastest path to an NVMe namespace, skipping the block layer.
pub struct PassthruEngine {
    ring: IoUring<io_uring::squeue::Entry128, io_uring::cqueue::Entry32>,
    file: OwnedFd,
    buf: AlignedBuf,
    bs: usize,
    nsid: u32,
    lba_shift: u32,
}

const NVME_URING_CMD_IO: u32 = 0xc048_4e80; // _IOWR('N', 0x80, struct nvme_uring_cmd)
const NVME_IOCTL_ID: libc::c_ulong = 0x4e40; // _IO('N', 0x40)

impl PassthruEngine {
    /// Opens the NVMe generic character device `path` (e.g. /dev/ng0n1).
    pub fn open(path: &Path, iodepth: usize, bs: usize) -> Result<Self, EngineError> {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let block = name.strip_prefix("ng").map(|rest| format!("nvme{rest}")).ok_or_else(|| {
            EngineError::Failed(format!("{} is not an NVMe generic device (/dev/ngXnY)", path.display()))
        })?;
        let lba: u32 = std::fs::read_to_string(format!("/sys/block/{block}/queue/logical_block_size"))?
            .trim()
            .parse()
            .map_err(|e| EngineError::Failed(format!("LBA size of {block}: {e}")))?;
        let file: OwnedFd = std::fs::OpenOptions::new().read(true).write(true).open(path)?.into();
        // SAFETY: NVME_IOCTL_ID takes no argument and returns the namespace id.
        let nsid = unsafe { libc::ioctl(file.as_raw_fd(), NVME_IOCTL_ID) };
        if nsid <= 0 {
            return Err(EngineError::Failed(format!("NVME_IOCTL_ID: {}", std::io::Error::last_os_error())));
        }
        let ring = IoUring::builder().build((iodepth as u32).next_power_of_two().max(2))?;
        Ok(Self {
            ring,
            file,
            buf: AlignedBuf::new(iodepth * bs),
            bs,
            nsid: nsid as u32,
            lba_shift: lba.trailing_zeros(),
        })
    }
}

impl Engine for PassthruEngine {
    fn slot_mut(&mut self, slot: usize) -> &mut [u8] {
        assert!((slot + 1) * self.bs <= self.buf.layout.size());
        // SAFETY: in bounds (asserted); only slots with no I/O in flight are asked for.
        unsafe { std::slice::from_raw_parts_mut(self.buf.ptr.add(slot * self.bs), self.bs) }
    }
    fn queue(&mut self, slot: usize, write: bool, offset: u64) -> Result<(), EngineError> {
        let slba = offset >> self.lba_shift;
        let nlb = (self.bs >> self.lba_shift) as u32 - 1;
        let mut cmd = [0u8; 80];
        cmd[0] = if write { 0x01 } else { 0x02 };
        cmd[4..8].copy_from_slice(&self.nsid.to_le_bytes());
        // SAFETY: the slot lies inside the buffer (iodepth * bs bytes were allocated).
        let addr = unsafe { self.buf.ptr.add(slot * self.bs) } as u64;
        cmd[24..32].copy_from_slice(&addr.to_le_bytes());
        cmd[36..40].copy_from_slice(&(self.bs as u32).to_le_bytes());
        cmd[40..44].copy_from_slice(&(slba as u32).to_le_bytes());
        cmd[44..48].copy_from_slice(&((slba >> 32) as u32).to_le_bytes());
        cmd[48..52].copy_from_slice(&nlb.to_le_bytes());
        let entry = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), NVME_URING_CMD_IO)
            .cmd(cmd)
            .build()
            .user_data(slot as u64);
        // SAFETY: the command points into the buffer, which outlives the ring's use of it.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| EngineError::Failed("io_uring SQ full".into()))
    }
    fn submit(&mut self) -> Result<(), EngineError> {
        self.ring.submit()?;
        Ok(())
    }
    fn reap(&mut self, min: usize, out: &mut Vec<Done>) -> Result<(), EngineError> {
        reap_ring(&mut self.ring, min, out, |r| match r {
            0 => Ok(()),
            r if r < 0 => Err(std::io::Error::from_raw_os_error(-r).to_string()),
            status => Err(format!("NVMe status {status:#x}")),
        })
    }
}
