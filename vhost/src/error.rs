//! Errors of the backend.

/// A guest RAM region nvmed cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// The region's fd is not a memfd.
    #[error("guest RAM at GPA {gpa:#x} is not a memfd, so nvmed cannot register it; {hint}")]
    NotMemfd {
        /// Guest physical address of the region.
        gpa: u64,
        /// What to do about it.
        hint: &'static str,
    },
    /// The memfd is not sealed against shrinking.
    #[error("guest RAM at GPA {gpa:#x} is not sealed against shrinking (F_GET_SEALS: {seals:#x}; a tmpfs file or a memfd with seal=off); {hint}")]
    NotSealed {
        /// Guest physical address of the region.
        gpa: u64,
        /// The seals it has.
        seals: i32,
        /// What to do about it.
        hint: &'static str,
    },
    /// The memfd is sealed against writing: the device could not read into it.
    #[error("guest RAM at GPA {gpa:#x} is sealed against writing")]
    WriteSealed {
        /// Guest physical address of the region.
        gpa: u64,
    },
    /// Offset or length not a multiple of 4 KiB, as nvmed's RegisterBuffer requires.
    #[error(
        "guest RAM at GPA {gpa:#x} ({len:#x} bytes at file offset {file_offset:#x}) is not page aligned"
    )]
    Unaligned {
        /// Guest physical address of the region.
        gpa: u64,
        /// Its length.
        len: u64,
        /// Its offset in the memfd.
        file_offset: u64,
    },
    /// The region reaches past the end of its file.
    #[error("guest RAM at GPA {gpa:#x} ({len:#x} bytes at file offset {file_offset:#x}) reaches past the end of its file ({file_size:#x} bytes)")]
    PastEof {
        /// Guest physical address of the region.
        gpa: u64,
        /// Its length.
        len: u64,
        /// Its offset in the file.
        file_offset: u64,
        /// The file's size.
        file_size: u64,
    },
    /// fstat failed.
    #[error("guest RAM at GPA {gpa:#x}: fstat: {source}")]
    Stat {
        /// Guest physical address of the region.
        gpa: u64,
        /// Cause.
        source: std::io::Error,
    },
    /// The region has no file (QEMU always sends one; a test may not).
    #[error("guest RAM at GPA {gpa:#x} has no file descriptor")]
    NoFile {
        /// Guest physical address of the region.
        gpa: u64,
    },
    /// nvmed refused the registration (quota, memlock, ...).
    #[error("registering guest RAM at GPA {gpa:#x} ({len} bytes) with nvmed: {source}")]
    Register {
        /// Guest physical address of the region.
        gpa: u64,
        /// Its length.
        len: u64,
        /// Cause.
        source: nvmed_client::Error,
    },
}

/// Everything that stops the backend (as opposed to failing one guest request).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Talking to nvmed failed.
    #[error("nvmed: {0}")]
    Nvmed(#[from] nvmed_client::Error),
    /// The namespace asked for is not among those nvmed grants this uid.
    #[error("nvmed offers no namespace {nsid} to this user (it offers {offered:?})")]
    NoNamespace {
        /// Namespace asked for.
        nsid: u32,
        /// Namespaces offered.
        offered: Vec<u32>,
    },
    /// The namespace's LBA size is not one virtio-blk can express.
    #[error("namespace LBA size {0} is not a power of two between 512 and 65536")]
    LbaSize(u32),
    /// Guest RAM that cannot be served.
    #[error(transparent)]
    Region(#[from] RegionError),
    /// vhost-user machinery failed.
    #[error("vhost-user: {0}")]
    VhostUser(String),
    /// A system call failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
}
