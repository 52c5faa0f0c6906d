//! NVMe definitions shared by the driver and the emulated controller (NVMe Base 1.4).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Controller Capabilities.
pub const REG_CAP: u64 = 0x00;
/// Version.
pub const REG_VS: u64 = 0x08;
/// Interrupt Mask Set.
pub const REG_INTMS: u64 = 0x0c;
/// Interrupt Mask Clear.
pub const REG_INTMC: u64 = 0x10;
/// Controller Configuration.
pub const REG_CC: u64 = 0x14;
/// Controller Status.
pub const REG_CSTS: u64 = 0x1c;
/// Admin Queue Attributes.
pub const REG_AQA: u64 = 0x24;
/// Admin Submission Queue base.
pub const REG_ASQ: u64 = 0x28;
/// Admin Completion Queue base.
pub const REG_ACQ: u64 = 0x30;
/// First doorbell.
pub const REG_DOORBELL_BASE: u64 = 0x1000;
/// Controller Ready Timeouts (NVMe 2.0; valid when CAP.CRMS.CRWMS is set): CRWMT in bits 15:0,
/// CRIMT in bits 31:16, both in 500 ms units.
pub const REG_CRTO: u64 = 0x68;

/// CC.EN.
pub const CC_EN: u32 = 1;
/// CC.SHN = normal shutdown.
pub const CC_SHN_NORMAL: u32 = 1 << 14;
/// CC.SHN mask.
pub const CC_SHN_MASK: u32 = 3 << 14;
/// CSTS.RDY.
pub const CSTS_RDY: u32 = 1;
/// CSTS.CFS (controller fatal status).
pub const CSTS_CFS: u32 = 1 << 1;
/// CSTS.SHST mask.
pub const CSTS_SHST_MASK: u32 = 3 << 2;
/// CSTS.SHST = shutdown complete.
pub const CSTS_SHST_COMPLETE: u32 = 2 << 2;

/// Offset of the doorbell of submission queue `qid` (`is_cq` false) or completion queue.
pub fn doorbell_offset(qid: u16, is_cq: bool, dstrd: u32) -> u64 {
    REG_DOORBELL_BASE + (2 * u64::from(qid) + u64::from(is_cq)) * (4u64 << dstrd)
}

/// Decoded CAP register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    /// Maximum queue entries supported (1-based).
    pub fn mqes(self) -> u32 {
        (self.0 & 0xffff) as u32 + 1
    }
    /// Worst-case time for CSTS.RDY to change, in milliseconds.
    pub fn timeout_ms(self) -> u64 {
        ((self.0 >> 24) & 0xff) * 500
    }
    /// Whether CRTO reports the controller's time to become ready with its media (CAP.CRMS.CRWMS,
    /// bit 59, NVMe 2.0).
    pub fn crwms(self) -> bool {
        (self.0 >> 59) & 1 == 1
    }
    /// Doorbell stride exponent.
    pub fn dstrd(self) -> u32 {
        ((self.0 >> 32) & 0xf) as u32
    }
    /// Whether the NVM command set is supported.
    pub fn css_nvm(self) -> bool {
        (self.0 >> 37) & 1 == 1
    }
    /// Whether the controller supports I/O command sets (CSS bit 6: command-set specific
    /// Identify data, NVMe 2.0 and 1.4 controllers with that technical proposal).
    pub fn css_iocs(self) -> bool {
        (self.0 >> 43) & 1 == 1
    }
    /// Smallest memory page size, in bytes.
    pub fn mps_min(self) -> u64 {
        1 << (12 + ((self.0 >> 48) & 0xf))
    }
    /// Largest memory page size, in bytes.
    pub fn mps_max(self) -> u64 {
        1 << (12 + ((self.0 >> 52) & 0xf))
    }
}

/// Admin opcodes.
pub mod admin {
    /// Delete I/O Submission Queue.
    pub const DELETE_SQ: u8 = 0x00;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Create I/O Submission Queue.
    pub const CREATE_SQ: u8 = 0x01;
    /// Delete I/O Completion Queue.
    pub const DELETE_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0a;
    /// Identify CNS: namespace.
    pub const CNS_NAMESPACE: u32 = 0x00;
    /// Identify CNS: controller.
    pub const CNS_CONTROLLER: u32 = 0x01;
    /// Identify CNS: active namespace id list.
    pub const CNS_ACTIVE_NS_LIST: u32 = 0x02;
    /// Identify CNS: Namespace Identification Descriptor list (NVMe 1.3 and later).
    pub const CNS_NS_DESCRIPTORS: u32 = 0x03;
    /// Identify CNS: I/O command set specific Identify Controller (for the command set named
    /// by CDW11.CSI; 0 = NVM: [`super::id_ctrl_nvm`]).
    pub const CNS_CS_CONTROLLER: u32 = 0x06;
    /// Feature: number of queues.
    pub const FEAT_NUM_QUEUES: u32 = 0x07;
    /// Log page: SMART / Health Information (512 bytes).
    pub const LID_SMART: u8 = 0x02;
    /// Namespace id meaning "the controller as a whole" (all namespaces).
    pub const NSID_ALL: u32 = 0xffff_ffff;
}

/// NVM command set I/O opcodes.
pub mod io {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DSM: u8 = 0x09;
    /// CDW12 FUA bit.
    pub const CDW12_FUA: u32 = 1 << 30;
    /// DSM CDW11 attribute: deallocate.
    pub const DSM_DEALLOCATE: u32 = 1 << 2;
}

/// Scatter gather lists (NVMe Base 1.4, 4.4).
pub mod sgl {
    /// Command flags: PSDT = 01b, data described by SGLs (MPTR a plain address).
    pub const PSDT_SGL: u8 = 1 << 6;
    /// Command flags: PSDT mask (bits 7:6).
    pub const PSDT_MASK: u8 = 3 << 6;
    /// Descriptor type (identifier bits 7:4): SGL Data Block.
    pub const DATA_BLOCK: u8 = 0x0;
    /// Descriptor type: SGL Bit Bucket.
    pub const BIT_BUCKET: u8 = 0x1;
    /// Descriptor type: SGL Segment (points at a list whose last entry may chain further).
    pub const SEGMENT: u8 = 0x2;
    /// Descriptor type: SGL Last Segment (points at the final list).
    pub const LAST_SEGMENT: u8 = 0x3;
    /// Bytes of one descriptor.
    pub const DESCRIPTOR_SIZE: u64 = 16;

    /// Builds a descriptor: (address, length, type), as the two little-endian u64 words it
    /// occupies (also the PRP1/PRP2 fields when it is SGL1 in a command).
    pub fn descriptor(address: u64, length: u32, kind: u8) -> (u64, u64) {
        (address, u64::from(length) | (u64::from(kind << 4) << 56))
    }

    /// Splits a descriptor's words into (address, length, type, sub type).
    pub fn parse(words: (u64, u64)) -> (u64, u32, u8, u8) {
        let id = (words.1 >> 56) as u8;
        (words.0, words.1 as u32, id >> 4, id & 0xf)
    }
}

/// Generic status codes (SCT 0) used here.
pub mod sc {
    /// Successful completion.
    pub const SUCCESS: u8 = 0x00;
    /// Invalid command opcode.
    pub const INVALID_OPCODE: u8 = 0x01;
    /// Invalid field in command.
    pub const INVALID_FIELD: u8 = 0x02;
    /// Data transfer error.
    pub const DATA_TRANSFER_ERROR: u8 = 0x04;
    /// Internal error.
    pub const INTERNAL: u8 = 0x06;
    /// Command aborted due to SQ deletion.
    pub const ABORTED_SQ_DELETION: u8 = 0x08;
    /// Invalid namespace or format.
    pub const INVALID_NAMESPACE: u8 = 0x0b;
    /// LBA out of range.
    pub const LBA_OUT_OF_RANGE: u8 = 0x80;
    /// Invalid SGL segment descriptor.
    pub const INVALID_SGL_SEGMENT: u8 = 0x0d;
    /// Invalid number of SGL descriptors.
    pub const INVALID_SGL_COUNT: u8 = 0x0e;
    /// Data SGL length invalid (the SGL describes less data than the command moves).
    pub const DATA_SGL_LENGTH_INVALID: u8 = 0x0f;
    /// SGL descriptor type invalid.
    pub const SGL_DESCRIPTOR_TYPE_INVALID: u8 = 0x11;
    /// Command specific (SCT 1): completion queue invalid.
    pub const CS_INVALID_CQ: u8 = 0x00;
    /// Command specific (SCT 1): invalid queue identifier.
    pub const CS_INVALID_QID: u8 = 0x01;
    /// Command specific (SCT 1): invalid queue size.
    pub const CS_INVALID_QSIZE: u8 = 0x02;
    /// Command specific (SCT 1): invalid queue deletion.
    pub const CS_INVALID_QUEUE_DELETION: u8 = 0x0c;
}

/// A 64-byte NVMe submission queue entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct NvmeCommand {
    /// Opcode.
    pub opcode: u8,
    /// Fused operation and PSDT (zero: PRPs).
    pub flags: u8,
    /// Command identifier.
    pub cid: u16,
    /// Namespace.
    pub nsid: u32,
    /// Command dword 2.
    pub cdw2: u32,
    /// Command dword 3.
    pub cdw3: u32,
    /// Metadata pointer.
    pub mptr: u64,
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2.
    pub prp2: u64,
    /// Command dword 10.
    pub cdw10: u32,
    /// Command dword 11.
    pub cdw11: u32,
    /// Command dword 12.
    pub cdw12: u32,
    /// Command dword 13.
    pub cdw13: u32,
    /// Command dword 14.
    pub cdw14: u32,
    /// Command dword 15.
    pub cdw15: u32,
}

/// A 16-byte NVMe completion queue entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct NvmeCompletion {
    /// Command specific result.
    pub result: u32,
    /// Reserved.
    pub reserved: u32,
    /// Submission queue head pointer.
    pub sq_head: u16,
    /// Submission queue identifier.
    pub sq_id: u16,
    /// Command identifier.
    pub cid: u16,
    /// Phase tag (bit 0) and status field (bits 1..=15).
    pub status: u16,
}

const _: () = assert!(core::mem::size_of::<NvmeCommand>() == 64);
const _: () = assert!(core::mem::size_of::<NvmeCompletion>() == 16);

impl NvmeCompletion {
    /// Phase tag.
    pub fn phase(&self) -> bool {
        self.status & 1 == 1
    }
    /// Status field without the phase bit (SC in bits 0..8, SCT 8..11, DNR 14).
    pub fn status_field(&self) -> u16 {
        self.status >> 1
    }
}

/// Builds a status field from SCT and SC (with DNR set for errors).
pub fn status_field(sct: u8, sc: u8) -> u16 {
    let dnr = if sct == 0 && sc == 0 { 0 } else { 1 << 14 };
    dnr | (u16::from(sct & 7) << 8) | u16::from(sc)
}

/// Byte offsets in the Identify Controller data structure.
pub mod id_ctrl {
    /// Serial number (20 bytes).
    pub const SN: usize = 4;
    /// Model number (40 bytes).
    pub const MN: usize = 24;
    /// Firmware revision (8 bytes).
    pub const FR: usize = 64;
    /// Maximum data transfer size (power of two of MPSMIN pages, 0 = no limit).
    pub const MDTS: usize = 77;
    /// RTD3 entry latency (u32, microseconds; 0 = not reported): how long a normal shutdown
    /// may take.
    pub const RTD3E: usize = 88;
    /// Submission queue entry sizes.
    pub const SQES: usize = 512;
    /// Completion queue entry sizes.
    pub const CQES: usize = 513;
    /// Number of namespaces (u32).
    pub const NN: usize = 516;
    /// Optional NVM command support (u16).
    pub const ONCS: usize = 520;
    /// Volatile write cache.
    pub const VWC: usize = 525;
    /// SGL support (u32): bits 1:0 = 01b SGLs without alignment rules, 10b SGLs whose data
    /// blocks must be dword aligned in address and length.
    pub const SGLS: usize = 536;
    /// ONCS bit: Dataset Management.
    pub const ONCS_DSM: u16 = 1 << 2;
    /// ONCS bit: Write Zeroes.
    pub const ONCS_WRITE_ZEROES: u16 = 1 << 3;
}

/// Byte offsets in the NVM command set specific Identify Controller data structure (CNS 06h,
/// CSI 0).
pub mod id_ctrl_nvm {
    /// Write Zeroes Size Limit: a power of two of CAP.MPSMIN pages; 0 = no limit beyond the
    /// command's 16-bit block count.
    pub const WZSL: usize = 1;
    /// Dataset Management Range Size Limit (u32, LBAs; 0 = none).
    pub const DMRSL: usize = 4;
    /// Dataset Management Size Limit (u64, LBAs of all ranges of one command; 0 = none).
    pub const DMSL: usize = 8;

    /// The largest Write Zeroes in bytes a WZSL value allows (`None`: no limit, also when the
    /// limit does not fit in 64 bits).
    pub fn wzsl_bytes(mps_min: u64, wzsl: u8) -> Option<u64> {
        if wzsl == 0 {
            return None;
        }
        1u64.checked_shl(u32::from(wzsl)).and_then(|pages| mps_min.checked_mul(pages))
    }

    /// Most LBAs one single-range deallocation may cover under DMRSL and DMSL (0 = none):
    /// the smaller of the limits set (`None`: neither is).
    pub fn deallocate_blocks(dmrsl: u32, dmsl: u64) -> Option<u32> {
        let dmsl = u32::try_from(dmsl).unwrap_or(u32::MAX);
        [dmrsl, dmsl].into_iter().filter(|&l| l != 0).min()
    }
}

/// Byte offsets in the Identify Namespace data structure.
pub mod id_ns {
    /// Namespace size in LBAs (u64).
    pub const NSZE: usize = 0;
    /// Namespace capacity (u64).
    pub const NCAP: usize = 8;
    /// Namespace utilization (u64).
    pub const NUSE: usize = 16;
    /// Number of LBA formats (0-based).
    pub const NLBAF: usize = 25;
    /// Formatted LBA size: the format's index in bits 0..4 (low) and 5..7 (high, NVMe 2.0:
    /// more than 16 formats).
    pub const FLBAS: usize = 26;
    /// LBA formats in the data structure (bytes 128..384).
    pub const LBAF_MAX: usize = 64;

    /// The LBA format in use: FLBAS's index (both parts, as Linux's `nvme_lbaf_index`), if it
    /// names one of the NLBAF + 1 formats the namespace reports.
    pub fn lba_format_index(flbas: u8, nlbaf: u8) -> Option<usize> {
        let index = usize::from(flbas & 0xf) | usize::from((flbas & 0x60) >> 1);
        (index <= usize::from(nlbaf) && index < LBAF_MAX).then_some(index)
    }
    /// End-to-end data protection type settings (PI type in bits 0..3).
    pub const DPS: usize = 29;
    /// LBA format 0 (4 bytes each: MS u16, LBADS u8, RP u8).
    pub const LBAF0: usize = 128;
}

/// Namespace Identification Descriptors (Identify CNS 03h): each is NIDT, NIDL, two reserved
/// bytes, then NIDL bytes of identifier; a zero NIDT ends the list.
pub mod ns_descriptor {
    /// Descriptor header length.
    pub const HEADER: usize = 4;
    /// NIDT: Command Set Identifier (one byte).
    pub const NIDT_CSI: u8 = 0x04;
    /// Command Set Identifier: NVM.
    pub const CSI_NVM: u8 = 0x00;
    /// Command Set Identifier: Key Value.
    pub const CSI_KEY_VALUE: u8 = 0x01;
    /// Command Set Identifier: Zoned Namespace.
    pub const CSI_ZONED: u8 = 0x02;
}
