//! Completion statuses: NVMe statuses passed through, plus the broker's own.

use core::fmt;

const KIND_SHIFT: u32 = 24;
const KIND_NVME: u32 = 1;
const KIND_BROKER: u32 = 2;

/// A status the broker itself gives, without the device being asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum BrokerStatus {
    /// The opcode byte is not a known [`crate::Opcode`].
    InvalidOpcode = 1,
    /// Unknown flag bits or non-zero reserved fields.
    InvalidField = 2,
    /// The namespace id is not one the broker serves.
    InvalidNamespace = 3,
    /// The buffer id (of the data, or of a segment) is not registered by this client.
    BadBuffer = 4,
    /// `buf_offset + len` (or a segment's `offset + len`) lies outside the registered buffer.
    BufferRange = 5,
    /// `offset + len` lies past the end of the namespace (or the client's window).
    OutOfRange = 6,
    /// Offset or length is not a multiple of the LBA size, or the buffer offset is not 4-byte aligned.
    Misaligned = 7,
    /// A data operation of length zero.
    ZeroLength = 8,
    /// Longer than the namespace's maximum transfer size.
    TooLarge = 9,
    /// The client's policy does not allow this operation.
    NotPermitted = 10,
    /// Aborted because the controller was reset.
    DeviceReset = 11,
    /// The controller failed (fatal status) and the command could not complete.
    DeviceFault = 12,
    /// A vectored request's segment count is zero or above [`crate::MAX_SEGMENTS`].
    BadSegmentCount = 13,
    /// A vectored request's segment list is not 8-byte aligned or not inside its buffer.
    SegmentListRange = 14,
    /// A segment of zero length, or segment lengths that do not add up to the request's `len`.
    SegmentLength = 15,
    /// The controller is gone (surprise removal): nothing can reach it any more.
    DeviceGone = 16,
    /// Never sent by the broker: the client library's answer for a request that was still
    /// outstanding when its session ended for good (the broker went away or ended the
    /// session, and there is no reconnecting). The device no longer uses its buffers.
    SessionEnded = 17,
}

impl BrokerStatus {
    /// Decodes a broker status code.
    pub fn from_code(code: u16) -> Option<Self> {
        use BrokerStatus::*;
        Some(match code {
            1 => InvalidOpcode,
            2 => InvalidField,
            3 => InvalidNamespace,
            4 => BadBuffer,
            5 => BufferRange,
            6 => OutOfRange,
            7 => Misaligned,
            8 => ZeroLength,
            9 => TooLarge,
            10 => NotPermitted,
            11 => DeviceReset,
            12 => DeviceFault,
            13 => BadSegmentCount,
            14 => SegmentListRange,
            15 => SegmentLength,
            16 => DeviceGone,
            17 => SessionEnded,
            _ => return None,
        })
    }

    /// A sentence describing the status.
    pub fn message(self) -> &'static str {
        use BrokerStatus::*;
        match self {
            InvalidOpcode => "unknown opcode",
            InvalidField => "unknown flags or non-zero reserved field",
            InvalidNamespace => "no such namespace",
            BadBuffer => "buffer id (of the data or of a segment) not registered by this client",
            BufferRange => "buffer (or segment) offset + length past the end of the buffer",
            OutOfRange => "offset + length past the end of the namespace",
            Misaligned => "offset/length not a multiple of the LBA size, or buffer offset not 4-byte aligned",
            ZeroLength => "zero-length transfer",
            TooLarge => "longer than the namespace's maximum transfer size",
            NotPermitted => "operation not permitted for this client",
            DeviceReset => "aborted because the controller was reset",
            DeviceFault => "controller failed",
            DeviceGone => "the controller is gone (removed)",
            SessionEnded => "the session ended (the broker went away) before the request completed",
            BadSegmentCount => "segment count is zero or above 256",
            SegmentListRange => "segment list not 8-byte aligned or not inside its buffer",
            SegmentLength => {
                "a zero-length segment, or segment lengths that do not add up to the request length"
            }
        }
    }
}

/// An NVMe completion status (status code type and status code) as the controller gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NvmeStatus {
    /// Status Code Type (3 bits).
    pub sct: u8,
    /// Status Code.
    pub sc: u8,
    /// Do Not Retry.
    pub dnr: bool,
}

impl NvmeStatus {
    /// Builds from the 15-bit status field of an NVMe completion (bits 1..=15 of DW3's upper half).
    pub fn from_status_field(field: u16) -> Self {
        Self { sc: (field & 0xff) as u8, sct: ((field >> 8) & 0x7) as u8, dnr: field & (1 << 14) != 0 }
    }

    fn describe(self) -> &'static str {
        match (self.sct, self.sc) {
            (0, 0x01) => "invalid command opcode",
            (0, 0x02) => "invalid field in command",
            (0, 0x04) => "data transfer error",
            (0, 0x06) => "internal error",
            (0, 0x07) => "command abort requested",
            (0, 0x08) => "command aborted due to SQ deletion",
            (0, 0x0b) => "invalid namespace or format",
            (0, 0x80) => "LBA out of range",
            (0, 0x81) => "capacity exceeded",
            (0, 0x82) => "namespace not ready",
            (2, 0x80) => "write fault",
            (2, 0x81) => "unrecovered read error",
            (2, 0x86) => "access denied",
            (2, 0x87) => "deallocated or unwritten logical block",
            (0, _) => "generic command status",
            (1, _) => "command specific status",
            (2, _) => "media and data integrity error",
            (3, _) => "path related status",
            _ => "vendor specific status",
        }
    }
}

/// Status of a completed request, as carried in [`crate::Cqe::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// The request succeeded.
    Success,
    /// The device completed the command with an error status.
    Nvme(NvmeStatus),
    /// The broker refused or aborted the request.
    Broker(BrokerStatus),
    /// A status word this version does not know.
    Unknown(u32),
}

impl Status {
    /// Encodes the status for a completion entry.
    pub fn encode(self) -> u32 {
        match self {
            Status::Success => 0,
            Status::Nvme(s) => {
                (KIND_NVME << KIND_SHIFT)
                    | (u32::from(s.dnr) << 15)
                    | (u32::from(s.sct & 7) << 8)
                    | u32::from(s.sc)
            }
            Status::Broker(b) => (KIND_BROKER << KIND_SHIFT) | b as u32,
            Status::Unknown(v) => v,
        }
    }

    /// Decodes a completion entry's status word.
    pub fn decode(word: u32) -> Self {
        if word == 0 {
            return Status::Success;
        }
        match word >> KIND_SHIFT {
            KIND_NVME => Status::Nvme(NvmeStatus {
                sc: (word & 0xff) as u8,
                sct: ((word >> 8) & 7) as u8,
                dnr: word & (1 << 15) != 0,
            }),
            KIND_BROKER => match BrokerStatus::from_code((word & 0xffff) as u16) {
                Some(b) => Status::Broker(b),
                None => Status::Unknown(word),
            },
            _ => Status::Unknown(word),
        }
    }

    /// Whether this is [`Status::Success`].
    pub fn is_success(self) -> bool {
        self == Status::Success
    }
}

impl From<BrokerStatus> for Status {
    fn from(b: BrokerStatus) -> Self {
        Status::Broker(b)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Success => f.write_str("success"),
            Status::Nvme(s) => write!(
                f,
                "NVMe status SCT {:#x} SC {:#04x}: {}{}",
                s.sct,
                s.sc,
                s.describe(),
                if s.dnr { " (do not retry)" } else { "" }
            ),
            Status::Broker(b) => write!(f, "broker: {}", b.message()),
            Status::Unknown(v) => write!(f, "unknown status word {v:#010x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip() {
        for code in 1..=15u16 {
            let s = Status::Broker(BrokerStatus::from_code(code).unwrap());
            assert_eq!(Status::decode(s.encode()), s);
        }
        for sct in 0..8u8 {
            for sc in [0u8, 1, 2, 0x80, 0xff] {
                let s = Status::Nvme(NvmeStatus { sct, sc, dnr: sc & 1 == 1 });
                assert_eq!(Status::decode(s.encode()), s);
            }
        }
        assert_eq!(Status::decode(0), Status::Success);
        assert!(matches!(Status::decode(0x7f00_0000), Status::Unknown(_)));
    }

    #[test]
    fn display_names_the_problem() {
        let s = Status::Broker(BrokerStatus::OutOfRange).to_string();
        assert!(s.contains("past the end of the namespace"), "{s}");
        let n = Status::Nvme(NvmeStatus { sct: 0, sc: 0x80, dnr: true }).to_string();
        assert!(n.contains("LBA out of range") && n.contains("do not retry"), "{n}");
    }
}
