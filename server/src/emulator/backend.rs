//! Storage behind the emulated namespaces: memory, a file, or nothing (null).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use nvmed_proto::shm::SharedMemory;

/// Where a namespace keeps its blocks.
pub trait Backend: Send + Sync {
    /// Capacity in bytes.
    fn size(&self) -> u64;

    /// Copies `len` bytes at `offset` to `dst`.
    ///
    /// # Safety
    /// `dst` must be valid for `len` bytes of writes.
    unsafe fn read_into(&self, offset: u64, dst: *mut u8, len: usize) -> io::Result<()>;

    /// Stores `len` bytes from `src` at `offset`.
    ///
    /// # Safety
    /// `src` must be valid for `len` bytes of reads.
    unsafe fn write_from(&self, offset: u64, src: *const u8, len: usize) -> io::Result<()>;

    /// Makes completed writes durable.
    fn flush(&self) -> io::Result<()>;

    /// Zeroes a range.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Discards a range; it reads back as zeroes afterwards.
    fn deallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len)
    }
}

/// Blocks in anonymous memory (sparse: untouched blocks cost nothing).
pub struct MemoryBackend {
    mem: SharedMemory,
}

impl MemoryBackend {
    /// A zeroed namespace of `size` bytes.
    pub fn new(size: u64) -> io::Result<Self> {
        Ok(Self { mem: SharedMemory::anonymous(size as usize)? })
    }

    /// A zeroed namespace of `size` bytes, all of it backed by memory now (huge pages where
    /// the kernel has them): no page faults in the I/O thread's copies later (for benchmarks of
    /// the steady state; see [`SharedMemory::populate`]).
    pub fn populated(size: u64) -> io::Result<Self> {
        let b = Self::new(size)?;
        b.mem.populate()?;
        Ok(b)
    }
}

impl Backend for MemoryBackend {
    fn size(&self) -> u64 {
        self.mem.len() as u64
    }

    unsafe fn read_into(&self, offset: u64, dst: *mut u8, len: usize) -> io::Result<()> {
        assert!(offset as usize + len <= self.mem.len());
        // SAFETY: the source range is inside the backing mapping (asserted); the caller vouches for `dst`.
        unsafe { std::ptr::copy_nonoverlapping(self.mem.as_ptr().add(offset as usize), dst, len) };
        Ok(())
    }

    unsafe fn write_from(&self, offset: u64, src: *const u8, len: usize) -> io::Result<()> {
        assert!(offset as usize + len <= self.mem.len());
        // SAFETY: the destination range is inside the backing mapping (asserted); the caller vouches for `src`.
        unsafe { std::ptr::copy_nonoverlapping(src, self.mem.as_ptr().add(offset as usize), len) };
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mem.fill(offset as usize, len as usize, 0);
        Ok(())
    }
}

/// Blocks in a file (persistent across broker restarts).
pub struct FileBackend {
    file: File,
    size: u64,
}

impl FileBackend {
    /// Opens or creates `path`, sized to `size` bytes if it is smaller (or `size` is given
    /// and the file is new); with `size` `None` the file's own size is used.
    pub fn open(path: &Path, size: Option<u64>) -> io::Result<Self> {
        let file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let current = file.metadata()?.len();
        let size = match size {
            Some(s) if s > current => {
                file.set_len(s)?;
                s
            }
            Some(s) => s,
            None => current,
        };
        if size == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "backing file is empty; give --size"));
        }
        Ok(Self { file, size })
    }
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    unsafe fn read_into(&self, offset: u64, dst: *mut u8, len: usize) -> io::Result<()> {
        // SAFETY: the caller vouches that `dst` is valid for `len` bytes; the slice lives only
        // for this call and this process writes nothing else there meanwhile.
        let buf = unsafe { std::slice::from_raw_parts_mut(dst, len) };
        self.file.read_exact_at(buf, offset)
    }

    unsafe fn write_from(&self, offset: u64, src: *const u8, len: usize) -> io::Result<()> {
        // SAFETY: the caller vouches that `src` is valid for `len` bytes of reads.
        let buf = unsafe { std::slice::from_raw_parts(src, len) };
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// A namespace that stores nothing: commands complete without moving data (like null_blk),
/// to measure the cost of everything but the data.
pub struct NullBackend {
    size: u64,
}

impl NullBackend {
    /// A null namespace claiming `size` bytes.
    pub fn new(size: u64) -> Self {
        Self { size }
    }
}

impl Backend for NullBackend {
    fn size(&self) -> u64 {
        self.size
    }
    unsafe fn read_into(&self, _: u64, _: *mut u8, _: usize) -> io::Result<()> {
        Ok(())
    }
    unsafe fn write_from(&self, _: u64, _: *const u8, _: usize) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
}
