//! The NVMe/TCP PDU codec (NVMe over Fabrics TCP transport, TP 8000): fixed-layout headers as
//! size-asserted zerocopy structs, header checks that turn any malformed input into a typed
//! [`PduError`] carrying the fatal error status a C2HTermReq reports, CRC32C digests, and
//! encoders for the PDUs a target sends.
//!
//! A PDU is a common header (8 bytes: type, flags, `hlen`, `pdo`, `plen`), the rest of its
//! type's header, an optional header digest, optional padding up to `pdo`, data, and an
//! optional data digest. [`check_common`] validates the first 8 bytes against the negotiated
//! digests and tells how many header bytes follow and how much data; [`decode_header`] then
//! checks the header digest and gives the typed header. [`parse`] does both on a whole PDU in
//! memory (the test initiator and the fuzz tests use it); the target's receive path reads data
//! straight into its destination instead.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// PDU types.
pub mod pdu_type {
    /// Initialize Connection Request (host to controller).
    pub const IC_REQ: u8 = 0x00;
    /// Initialize Connection Response.
    pub const IC_RESP: u8 = 0x01;
    /// Host to controller terminate connection request.
    pub const H2C_TERM_REQ: u8 = 0x02;
    /// Controller to host terminate connection request.
    pub const C2H_TERM_REQ: u8 = 0x03;
    /// Command capsule.
    pub const CAPSULE_CMD: u8 = 0x04;
    /// Response capsule.
    pub const CAPSULE_RESP: u8 = 0x05;
    /// Host to controller data.
    pub const H2C_DATA: u8 = 0x06;
    /// Controller to host data.
    pub const C2H_DATA: u8 = 0x07;
    /// Ready to transfer.
    pub const R2T: u8 = 0x09;
}

/// Common header flags.
pub mod flags {
    /// A header digest follows the header.
    pub const HDGST: u8 = 0x01;
    /// A data digest follows the data.
    pub const DDGST: u8 = 0x02;
    /// Last data PDU of a transfer (H2CData, C2HData).
    pub const LAST_PDU: u8 = 0x04;
    /// C2HData: the command succeeded, no response capsule follows.
    pub const SUCCESS: u8 = 0x08;
}

/// Fatal error status values of a TermReq.
pub mod fes {
    /// Invalid PDU header field.
    pub const INVALID_HEADER: u16 = 0x01;
    /// PDU sequence error.
    pub const SEQUENCE: u16 = 0x02;
    /// Header digest error.
    pub const HEADER_DIGEST: u16 = 0x03;
    /// Data transfer out of range.
    pub const DATA_OUT_OF_RANGE: u16 = 0x04;
    /// Data transfer limit exceeded.
    pub const DATA_LIMIT: u16 = 0x05;
    /// Unsupported parameter.
    pub const UNSUPPORTED: u16 = 0x06;
}

/// Bytes of the common header.
pub const COMMON_LEN: usize = 8;
/// Bytes of a digest.
pub const DIGEST_LEN: usize = 4;
/// Header length of ICReq and ICResp.
pub const IC_LEN: usize = 128;
/// Header length of a command capsule (common header + 64-byte SQE).
pub const CMD_HLEN: usize = 72;
/// Header length of a response capsule, the data PDUs, R2T and TermReq.
pub const SHORT_HLEN: usize = 24;
/// Most bytes of the offending PDU's header a TermReq carries.
pub const TERM_MAX_DATA: usize = 128;
/// Longest header (with digest and padding) [`check_common`] accepts: `pdo` is one byte.
pub const MAX_HEADER: usize = 256;

/// The common header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CommonHeader {
    /// PDU type.
    pub pdu_type: u8,
    /// Flags.
    pub flags: u8,
    /// Header length.
    pub hlen: u8,
    /// Data offset.
    pub pdo: u8,
    /// Total PDU length.
    pub plen: U32,
}
const _: () = assert!(size_of::<CommonHeader>() == COMMON_LEN);

impl CommonHeader {
    fn new(pdu_type: u8, flags: u8, hlen: usize, pdo: usize, plen: usize) -> Self {
        Self { pdu_type, flags, hlen: hlen as u8, pdo: pdo as u8, plen: U32::new(plen as u32) }
    }
}

/// ICReq and ICResp (the same layout; `hpda_cpda` is HPDA in a request and CPDA in a response,
/// `max` is MAXR2T in a request and MAXH2CDATA in a response).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct IcPdu {
    /// Common header.
    pub hdr: CommonHeader,
    /// PDU format version (0).
    pub pfv: U16,
    /// Host (request) or controller (response) PDU data alignment, in 4-byte units minus one.
    pub hpda_cpda: u8,
    /// Digests: bit 0 header, bit 1 data.
    pub digest: u8,
    /// MAXR2T (0-based, request) or MAXH2CDATA (bytes, response).
    pub max: U32,
    /// Reserved.
    pub rsvd: [u8; 112],
}
const _: () = assert!(size_of::<IcPdu>() == IC_LEN);

/// A 64-byte NVMe submission queue entry as carried in a command capsule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct NvmeCmd {
    /// Opcode.
    pub opcode: u8,
    /// Flags (PSDT in bits 7:6).
    pub flags: u8,
    /// Command identifier.
    pub cid: U16,
    /// Namespace id (fabrics commands: byte 4 is the fabrics command type).
    pub nsid: U32,
    /// Command dwords 2 and 3.
    pub cdw2: [U32; 2],
    /// Metadata pointer.
    pub mptr: U64,
    /// SGL descriptor: address.
    pub sgl_addr: U64,
    /// SGL descriptor: length.
    pub sgl_len: U32,
    /// SGL descriptor: reserved.
    pub sgl_rsvd: [u8; 3],
    /// SGL descriptor: type (bits 7:4) and subtype (bits 3:0).
    pub sgl_type: u8,
    /// Command dwords 10 to 15.
    pub cdw: [U32; 6],
}
const _: () = assert!(size_of::<NvmeCmd>() == 64);

impl NvmeCmd {
    /// Command dword `n` (10..=15).
    pub fn cdw(&self, n: usize) -> u32 {
        self.cdw[n - 10].get()
    }
}

/// SGL descriptor types the TCP transport uses.
pub mod sgl {
    /// Data Block descriptor, offset subtype: in-capsule data.
    pub const IN_CAPSULE: u8 = 0x01;
    /// Transport SGL data block, transport-specific subtype: data moved by R2T/H2CData or C2HData.
    pub const TRANSPORT: u8 = 0x5A;
}

/// A 16-byte NVMe completion queue entry.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct NvmeCqe {
    /// Command specific result (DW0 and DW1).
    pub result: U64,
    /// Submission queue head.
    pub sqhd: U16,
    /// Submission queue id.
    pub sqid: U16,
    /// Command identifier.
    pub cid: U16,
    /// Status field (bit 0 phase, bits 15:1 status).
    pub status: U16,
}
const _: () = assert!(size_of::<NvmeCqe>() == 16);

/// Command capsule header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CapsuleCmd {
    /// Common header.
    pub hdr: CommonHeader,
    /// The command.
    pub cmd: NvmeCmd,
}
const _: () = assert!(size_of::<CapsuleCmd>() == CMD_HLEN);

/// Response capsule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CapsuleResp {
    /// Common header.
    pub hdr: CommonHeader,
    /// The completion.
    pub cqe: NvmeCqe,
}
const _: () = assert!(size_of::<CapsuleResp>() == SHORT_HLEN);

/// H2CData and C2HData header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DataPdu {
    /// Common header.
    pub hdr: CommonHeader,
    /// Command id of the command the data belongs to.
    pub cccid: U16,
    /// Transfer tag (H2CData: from the R2T; C2HData: reserved).
    pub ttag: U16,
    /// Offset of this data in the command's transfer.
    pub datao: U32,
    /// Data length.
    pub datal: U32,
    /// Reserved.
    pub rsvd: [u8; 4],
}
const _: () = assert!(size_of::<DataPdu>() == SHORT_HLEN);

/// R2T header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct R2tPdu {
    /// Common header.
    pub hdr: CommonHeader,
    /// Command id.
    pub cccid: U16,
    /// Transfer tag the host echoes in its H2CData PDUs.
    pub ttag: U16,
    /// Offset of the requested data.
    pub r2to: U32,
    /// Length of the requested data.
    pub r2tl: U32,
    /// Reserved.
    pub rsvd: [u8; 4],
}
const _: () = assert!(size_of::<R2tPdu>() == SHORT_HLEN);

/// H2CTermReq and C2HTermReq header (the offending PDU's header follows as data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct TermReqPdu {
    /// Common header.
    pub hdr: CommonHeader,
    /// Fatal error status.
    pub fes: U16,
    /// Fatal error information (byte offset of a bad header field, ...).
    pub fei: U32,
    /// Reserved.
    pub rsvd: [u8; 10],
}
const _: () = assert!(size_of::<TermReqPdu>() == SHORT_HLEN);

/// A malformed or unexpected PDU: each maps to the fatal error status of the TermReq that ends
/// the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    /// The PDU type is not one this side may receive.
    #[error("unexpected PDU type {0:#04x}")]
    BadType(u8),
    /// A header field has a value the protocol does not allow here.
    #[error("invalid header field at byte {offset}: {what}")]
    HeaderField {
        /// Byte offset of the field in the PDU.
        offset: u32,
        /// What is wrong.
        what: &'static str,
    },
    /// A PDU that is valid in itself but not at this point of the exchange.
    #[error("PDU out of sequence: {0}")]
    Sequence(&'static str),
    /// The header digest does not match.
    #[error("header digest mismatch (got {got:#010x}, computed {want:#010x})")]
    HeaderDigest {
        /// Digest received.
        got: u32,
        /// Digest computed.
        want: u32,
    },
    /// Data outside the range the command or R2T asked for.
    #[error("data transfer out of range: {0}")]
    DataOutOfRange(&'static str),
    /// A data PDU larger than the limit the peer was told.
    #[error("data transfer limit exceeded: {len} > {max}")]
    DataLimit {
        /// Length received.
        len: u32,
        /// Limit.
        max: u32,
    },
    /// A parameter this implementation does not support.
    #[error("unsupported parameter at byte {offset}: {what}")]
    Unsupported {
        /// Byte offset of the field.
        offset: u32,
        /// What.
        what: &'static str,
    },
    /// The PDU is shorter than its own lengths say (only from [`parse`] on a buffer).
    #[error("truncated PDU: {have} of {need} bytes")]
    Truncated {
        /// Bytes present.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
}

impl PduError {
    /// Fatal error status for the TermReq.
    pub fn fes(&self) -> u16 {
        match self {
            PduError::BadType(_) | PduError::HeaderField { .. } | PduError::Truncated { .. } => {
                fes::INVALID_HEADER
            }
            PduError::Sequence(_) => fes::SEQUENCE,
            PduError::HeaderDigest { .. } => fes::HEADER_DIGEST,
            PduError::DataOutOfRange(_) => fes::DATA_OUT_OF_RANGE,
            PduError::DataLimit { .. } => fes::DATA_LIMIT,
            PduError::Unsupported { .. } => fes::UNSUPPORTED,
        }
    }

    /// Fatal error information: the offending field's byte offset for header field errors.
    pub fn fei(&self) -> u32 {
        match self {
            PduError::BadType(_) => 0,
            PduError::HeaderField { offset, .. } | PduError::Unsupported { offset, .. } => *offset,
            _ => 0,
        }
    }
}

/// Digests negotiated by ICReq/ICResp.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    /// Header digest on every PDU but ICReq/ICResp and TermReqs.
    pub header: bool,
    /// Data digest on every PDU with data but TermReqs.
    pub data: bool,
}

impl Digests {
    /// The ICReq/ICResp DGST field.
    pub fn bits(self) -> u8 {
        u8::from(self.header) | (u8::from(self.data) << 1)
    }
    /// From the DGST field.
    pub fn from_bits(b: u8) -> Self {
        Self { header: b & 1 != 0, data: b & 2 != 0 }
    }
    fn hd(self) -> usize {
        if self.header {
            DIGEST_LEN
        } else {
            0
        }
    }
}

/// Which side is receiving: decides the PDU types allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receiver {
    /// The controller receives host PDUs.
    Controller,
    /// The host receives controller PDUs.
    Host,
}

/// Where a PDU's parts lie, from its common header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Type.
    pub pdu_type: u8,
    /// Flags.
    pub flags: u8,
    /// Header length (without digest).
    pub hlen: usize,
    /// Bytes from the PDU start to the data (header, digest, padding), or to the end when there
    /// is no data.
    pub data_offset: usize,
    /// Data bytes.
    pub data_len: usize,
    /// Whether the header carries a digest.
    pub header_digest: bool,
    /// Whether a data digest follows the data.
    pub data_digest: bool,
}

impl Layout {
    /// Total PDU bytes.
    pub fn plen(&self) -> usize {
        self.data_offset + self.data_len + if self.data_digest { DIGEST_LEN } else { 0 }
    }
}

/// Limits of the receiving side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most in-capsule data (command capsules) the receiver accepts.
    pub max_in_capsule: usize,
    /// Most data in one H2CData/C2HData PDU.
    pub max_data_pdu: usize,
}

fn short<E>(what: &'static str) -> impl FnOnce(E) -> PduError {
    move |_| field(0, what)
}

fn field(offset: u32, what: &'static str) -> PduError {
    PduError::HeaderField { offset, what }
}

/// Checks a common header received by `rx` after the connection was initialised with `dg`
/// (`None`: before ICReq/ICResp, when only those are allowed). Returns where its parts lie.
pub fn check_common(
    bytes: &[u8; COMMON_LEN],
    rx: Receiver,
    dg: Option<Digests>,
    limits: &Limits,
) -> Result<Layout, PduError> {
    let h = CommonHeader::read_from_bytes(bytes).expect("8 bytes");
    let t = h.pdu_type;
    let plen = h.plen.get() as usize;
    let (hlen, pdo) = (usize::from(h.hlen), usize::from(h.pdo));
    let allowed = match rx {
        Receiver::Controller => {
            matches!(
                t,
                pdu_type::IC_REQ | pdu_type::H2C_TERM_REQ | pdu_type::CAPSULE_CMD | pdu_type::H2C_DATA
            )
        }
        Receiver::Host => matches!(
            t,
            pdu_type::IC_RESP
                | pdu_type::C2H_TERM_REQ
                | pdu_type::CAPSULE_RESP
                | pdu_type::C2H_DATA
                | pdu_type::R2T
        ),
    };
    if !allowed {
        return Err(PduError::BadType(t));
    }
    let is_ic = matches!(t, pdu_type::IC_REQ | pdu_type::IC_RESP);
    let is_term = matches!(t, pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ);
    let dg = match dg {
        None if is_ic => Digests::default(),
        None if is_term => Digests::default(),
        None => return Err(PduError::Sequence("PDU before connection initialisation")),
        Some(_) if is_ic => return Err(PduError::Sequence("second ICReq/ICResp")),
        Some(d) => d,
    };
    let want_hlen = match t {
        pdu_type::IC_REQ | pdu_type::IC_RESP => IC_LEN,
        pdu_type::CAPSULE_CMD => CMD_HLEN,
        _ => SHORT_HLEN,
    };
    if hlen != want_hlen {
        return Err(field(2, "HLEN"));
    }
    if is_ic || is_term {
        // Never digested; ICs have no data, TermReqs carry the offending header.
        if h.flags != 0 && is_ic {
            return Err(field(1, "FLAGS"));
        }
        if pdo != 0 {
            return Err(field(3, "PDO"));
        }
        let max = if is_ic { IC_LEN } else { SHORT_HLEN + TERM_MAX_DATA };
        if plen < hlen || plen > max {
            return Err(field(4, "PLEN"));
        }
        return Ok(Layout {
            pdu_type: t,
            flags: h.flags,
            hlen,
            data_offset: hlen,
            data_len: plen - hlen,
            header_digest: false,
            data_digest: false,
        });
    }
    let hd = dg.hd();
    if (h.flags & flags::HDGST != 0) != dg.header {
        return Err(field(1, "HDGSTF does not match the negotiated header digest"));
    }
    let has_data_type = matches!(t, pdu_type::CAPSULE_CMD | pdu_type::H2C_DATA | pdu_type::C2H_DATA);
    let known = match t {
        pdu_type::H2C_DATA => flags::HDGST | flags::DDGST | flags::LAST_PDU,
        pdu_type::C2H_DATA => flags::HDGST | flags::DDGST | flags::LAST_PDU | flags::SUCCESS,
        pdu_type::CAPSULE_CMD => flags::HDGST | flags::DDGST,
        _ => flags::HDGST,
    };
    if h.flags & !known != 0 {
        return Err(field(1, "FLAGS"));
    }
    let head = hlen + hd;
    if plen < head {
        return Err(field(4, "PLEN shorter than the header"));
    }
    if plen == head {
        if pdo != 0 {
            return Err(field(3, "PDO without data"));
        }
        if matches!(t, pdu_type::H2C_DATA | pdu_type::C2H_DATA) {
            return Err(field(4, "data PDU without data"));
        }
        if h.flags & flags::DDGST != 0 {
            return Err(field(1, "DDGSTF without data"));
        }
        return Ok(Layout {
            pdu_type: t,
            flags: h.flags,
            hlen,
            data_offset: head,
            data_len: 0,
            header_digest: dg.header,
            data_digest: false,
        });
    }
    if !has_data_type {
        return Err(field(4, "PLEN: this PDU type carries no data"));
    }
    if pdo < head {
        return Err(field(3, "PDO inside the header"));
    }
    if (h.flags & flags::DDGST != 0) != dg.data {
        return Err(field(1, "DDGSTF does not match the negotiated data digest"));
    }
    let dd = if dg.data { DIGEST_LEN } else { 0 };
    if plen < pdo + dd + 1 {
        return Err(field(4, "PLEN shorter than PDO and data digest"));
    }
    let data_len = plen - pdo - dd;
    let max = if t == pdu_type::CAPSULE_CMD { limits.max_in_capsule } else { limits.max_data_pdu };
    if data_len > max {
        return Err(PduError::DataLimit { len: data_len as u32, max: max as u32 });
    }
    Ok(Layout {
        pdu_type: t,
        flags: h.flags,
        hlen,
        data_offset: pdo,
        data_len,
        header_digest: dg.header,
        data_digest: dg.data,
    })
}

/// A decoded PDU header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// ICReq.
    IcReq(IcPdu),
    /// ICResp.
    IcResp(IcPdu),
    /// H2CTermReq.
    H2cTermReq(TermReqPdu),
    /// C2HTermReq.
    C2hTermReq(TermReqPdu),
    /// Command capsule.
    CapsuleCmd(CapsuleCmd),
    /// Response capsule.
    CapsuleResp(CapsuleResp),
    /// H2CData.
    H2cData(DataPdu),
    /// C2HData.
    C2hData(DataPdu),
    /// R2T.
    R2t(R2tPdu),
}

/// CRC32C of `data` (the NVMe/TCP digest).
pub fn crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Continues a CRC32C over more data.
pub fn crc_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

/// Decodes the header `bytes` (`layout.data_offset` bytes from the PDU start: header, digest,
/// padding) after checking its digest and the fields [`check_common`] does not.
pub fn decode_header(bytes: &[u8], layout: &Layout) -> Result<Header, PduError> {
    assert!(bytes.len() >= layout.hlen + if layout.header_digest { DIGEST_LEN } else { 0 });
    let head = &bytes[..layout.hlen];
    if layout.header_digest {
        let got = u32::from_le_bytes(bytes[layout.hlen..layout.hlen + DIGEST_LEN].try_into().unwrap());
        let want = crc(head);
        if got != want {
            return Err(PduError::HeaderDigest { got, want });
        }
    }
    Ok(match layout.pdu_type {
        pdu_type::IC_REQ | pdu_type::IC_RESP => {
            let ic = IcPdu::read_from_bytes(head).map_err(short("IC length"))?;
            if ic.pfv.get() != 0 {
                return Err(PduError::Unsupported { offset: 8, what: "PFV" });
            }
            if ic.hpda_cpda > 31 {
                return Err(field(10, "HPDA/CPDA above 31"));
            }
            if ic.digest & !3 != 0 {
                return Err(field(11, "DGST"));
            }
            if layout.pdu_type == pdu_type::IC_REQ {
                Header::IcReq(ic)
            } else {
                Header::IcResp(ic)
            }
        }
        pdu_type::H2C_TERM_REQ => {
            Header::H2cTermReq(TermReqPdu::read_from_bytes(head).map_err(short("len"))?)
        }
        pdu_type::C2H_TERM_REQ => {
            Header::C2hTermReq(TermReqPdu::read_from_bytes(head).map_err(short("len"))?)
        }
        pdu_type::CAPSULE_CMD => Header::CapsuleCmd(CapsuleCmd::read_from_bytes(head).map_err(short("len"))?),
        pdu_type::CAPSULE_RESP => {
            Header::CapsuleResp(CapsuleResp::read_from_bytes(head).map_err(short("len"))?)
        }
        pdu_type::H2C_DATA | pdu_type::C2H_DATA => {
            let d = DataPdu::read_from_bytes(head).map_err(short("len"))?;
            if d.datal.get() as usize != layout.data_len {
                return Err(field(16, "DATAL does not match PLEN"));
            }
            if layout.pdu_type == pdu_type::H2C_DATA {
                Header::H2cData(d)
            } else {
                Header::C2hData(d)
            }
        }
        pdu_type::R2T => {
            let r = R2tPdu::read_from_bytes(head).map_err(short("len"))?;
            if r.r2tl.get() == 0 {
                return Err(field(16, "R2TL is zero"));
            }
            Header::R2t(r)
        }
        t => return Err(PduError::BadType(t)),
    })
}

/// A whole PDU parsed from memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed<'a> {
    /// Its header.
    pub header: Header,
    /// Its layout.
    pub layout: Layout,
    /// Its data (digest checked: see `data_digest_ok`).
    pub data: &'a [u8],
    /// Whether the data digest matched (true when there is none).
    pub data_digest_ok: bool,
}

/// Parses one whole PDU at the start of `buf`.
pub fn parse<'a>(
    buf: &'a [u8],
    rx: Receiver,
    dg: Option<Digests>,
    limits: &Limits,
) -> Result<Parsed<'a>, PduError> {
    if buf.len() < COMMON_LEN {
        return Err(PduError::Truncated { have: buf.len(), need: COMMON_LEN });
    }
    let layout = check_common(buf[..COMMON_LEN].try_into().unwrap(), rx, dg, limits)?;
    let plen = layout.plen();
    if buf.len() < plen {
        return Err(PduError::Truncated { have: buf.len(), need: plen });
    }
    let header = decode_header(&buf[..layout.data_offset], &layout)?;
    let data = &buf[layout.data_offset..layout.data_offset + layout.data_len];
    let data_digest_ok = !layout.data_digest || {
        let at = layout.data_offset + layout.data_len;
        u32::from_le_bytes(buf[at..at + DIGEST_LEN].try_into().unwrap()) == crc(data)
    };
    Ok(Parsed { header, layout, data, data_digest_ok })
}

/// Appends a header with its digest (when `dg.header`) and zero padding up to `pdo` to `out`.
fn push_header(out: &mut Vec<u8>, header: &[u8], dg: Digests, pdo: usize) {
    out.extend_from_slice(header);
    if dg.header {
        out.extend_from_slice(&crc(header).to_le_bytes());
    }
    let start = out.len() - header.len() - dg.hd();
    while out.len() - start < pdo {
        out.push(0);
    }
}

/// The data offset of a PDU with data: header, digest, padding to `(pda + 1) * 4` bytes.
pub fn data_offset(hlen: usize, dg: Digests, pda: u8) -> usize {
    let align = (usize::from(pda) + 1) * 4;
    (hlen + dg.hd()).next_multiple_of(align)
}

/// An ICReq (host side).
pub fn ic_req(dg: Digests, hpda: u8, maxr2t: u32) -> IcPdu {
    IcPdu {
        hdr: CommonHeader::new(pdu_type::IC_REQ, 0, IC_LEN, 0, IC_LEN),
        pfv: U16::new(0),
        hpda_cpda: hpda,
        digest: dg.bits(),
        max: U32::new(maxr2t),
        rsvd: [0; 112],
    }
}

/// An ICResp (controller side).
pub fn ic_resp(dg: Digests, cpda: u8, maxh2cdata: u32) -> IcPdu {
    IcPdu { hdr: CommonHeader::new(pdu_type::IC_RESP, 0, IC_LEN, 0, IC_LEN), ..ic_req(dg, cpda, maxh2cdata) }
}

fn hd_flag(dg: Digests) -> u8 {
    if dg.header {
        flags::HDGST
    } else {
        0
    }
}

/// Appends a response capsule.
pub fn push_capsule_resp(out: &mut Vec<u8>, dg: Digests, cqe: NvmeCqe) {
    let plen = SHORT_HLEN + dg.hd();
    let p =
        CapsuleResp { hdr: CommonHeader::new(pdu_type::CAPSULE_RESP, hd_flag(dg), SHORT_HLEN, 0, plen), cqe };
    push_header(out, p.as_bytes(), dg, 0);
}

/// Appends an R2T.
pub fn push_r2t(out: &mut Vec<u8>, dg: Digests, cccid: u16, ttag: u16, offset: u32, len: u32) {
    let plen = SHORT_HLEN + dg.hd();
    let p = R2tPdu {
        hdr: CommonHeader::new(pdu_type::R2T, hd_flag(dg), SHORT_HLEN, 0, plen),
        cccid: U16::new(cccid),
        ttag: U16::new(ttag),
        r2to: U32::new(offset),
        r2tl: U32::new(len),
        rsvd: [0; 4],
    };
    push_header(out, p.as_bytes(), dg, 0);
}

/// Appends the header part (up to the data) of an H2CData (`c2h` false) or C2HData PDU of
/// `len` bytes at `offset`; the caller sends the data and then, when `dg.data`, its digest.
#[allow(clippy::too_many_arguments)]
pub fn push_data_header(
    out: &mut Vec<u8>,
    dg: Digests,
    pda: u8,
    c2h: bool,
    cccid: u16,
    ttag: u16,
    offset: u32,
    len: u32,
    last: bool,
) {
    let pdo = data_offset(SHORT_HLEN, dg, pda);
    let dd = if dg.data { DIGEST_LEN } else { 0 };
    let mut f = hd_flag(dg) | if dg.data { flags::DDGST } else { 0 };
    if last {
        f |= flags::LAST_PDU;
    }
    let t = if c2h { pdu_type::C2H_DATA } else { pdu_type::H2C_DATA };
    let p = DataPdu {
        hdr: CommonHeader::new(t, f, SHORT_HLEN, pdo, pdo + len as usize + dd),
        cccid: U16::new(cccid),
        ttag: U16::new(ttag),
        datao: U32::new(offset),
        datal: U32::new(len),
        rsvd: [0; 4],
    };
    push_header(out, p.as_bytes(), dg, pdo);
}

/// Appends the header part of a command capsule with `data_len` bytes of in-capsule data
/// (which the caller sends next, then its digest when `dg.data` and `data_len > 0`).
pub fn push_capsule_cmd(out: &mut Vec<u8>, dg: Digests, cmd: NvmeCmd, data_len: usize) {
    let (pdo, dd) =
        if data_len > 0 { (CMD_HLEN + dg.hd(), if dg.data { DIGEST_LEN } else { 0 }) } else { (0, 0) };
    let mut f = hd_flag(dg);
    if data_len > 0 && dg.data {
        f |= flags::DDGST;
    }
    let plen = CMD_HLEN + dg.hd() + data_len + dd;
    let p = CapsuleCmd { hdr: CommonHeader::new(pdu_type::CAPSULE_CMD, f, CMD_HLEN, pdo, plen), cmd };
    push_header(out, p.as_bytes(), dg, 0);
}

/// Appends a TermReq (`c2h`: C2HTermReq, else H2CTermReq) carrying up to 152 bytes of the
/// offending PDU's header.
pub fn push_term_req(out: &mut Vec<u8>, c2h: bool, fes: u16, fei: u32, offending: &[u8]) {
    let n = offending.len().min(TERM_MAX_DATA);
    let t = if c2h { pdu_type::C2H_TERM_REQ } else { pdu_type::H2C_TERM_REQ };
    let p = TermReqPdu {
        hdr: CommonHeader::new(t, 0, SHORT_HLEN, 0, SHORT_HLEN + n),
        fes: U16::new(fes),
        fei: U32::new(fei),
        rsvd: [0; 10],
    };
    out.extend_from_slice(p.as_bytes());
    out.extend_from_slice(&offending[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use zerocopy::FromZeros;

    const LIM: Limits = Limits { max_in_capsule: 8192, max_data_pdu: 131072 };
    const BOTH: Digests = Digests { header: true, data: true };

    fn capsule(dg: Digests, data: &[u8]) -> Vec<u8> {
        let mut cmd = NvmeCmd::new_zeroed();
        cmd.opcode = 0x01;
        cmd.cid = U16::new(7);
        cmd.nsid = U32::new(1);
        cmd.sgl_type = sgl::IN_CAPSULE;
        cmd.sgl_len = U32::new(data.len() as u32);
        let mut v = Vec::new();
        push_capsule_cmd(&mut v, dg, cmd, data.len());
        v.extend_from_slice(data);
        if dg.data && !data.is_empty() {
            v.extend_from_slice(&crc(data).to_le_bytes());
        }
        v
    }

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc(b"123456789"), 0xE306_9283);
        assert_eq!(crc_append(crc(b"1234"), b"56789"), 0xE306_9283);
    }

    #[test]
    fn hand_built_icreq_parses() {
        // ICReq as the Linux host sends it: PFV 0, HPDA 0, header+data digests, MAXR2T 0.
        let mut b = vec![0u8; 128];
        b[0] = 0x00;
        b[2] = 128;
        b[4] = 128;
        b[11] = 0x03;
        let p = parse(&b, Receiver::Controller, None, &LIM).unwrap();
        let Header::IcReq(ic) = p.header else { panic!("{p:?}") };
        assert_eq!(Digests::from_bits(ic.digest), BOTH);
        assert_eq!(ic.max.get(), 0);
        // A second ICReq after initialisation is a sequence error.
        assert_eq!(parse(&b, Receiver::Controller, Some(BOTH), &LIM).unwrap_err().fes(), fes::SEQUENCE);
        // PFV 1 is unsupported; HLEN 127 is a bad field at byte 2.
        let mut bad = b.clone();
        bad[8] = 1;
        assert_eq!(parse(&bad, Receiver::Controller, None, &LIM).unwrap_err().fes(), fes::UNSUPPORTED);
        let mut bad = b.clone();
        bad[2] = 127;
        let e = parse(&bad, Receiver::Controller, None, &LIM).unwrap_err();
        assert_eq!((e.fes(), e.fei()), (fes::INVALID_HEADER, 2));
    }

    #[test]
    fn icresp_round_trip() {
        let r = ic_resp(Digests { header: true, data: false }, 0, 131072);
        let p = parse(r.as_bytes(), Receiver::Host, None, &LIM).unwrap();
        let Header::IcResp(ic) = p.header else { panic!() };
        assert_eq!(ic.max.get(), 131072);
        assert_eq!(ic.digest, 1);
        // A controller never receives an ICResp.
        assert_eq!(
            parse(r.as_bytes(), Receiver::Controller, None, &LIM).unwrap_err(),
            PduError::BadType(pdu_type::IC_RESP)
        );
    }

    #[test]
    fn capsule_with_in_capsule_data_and_digests() {
        let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let v = capsule(BOTH, &data);
        assert_eq!(v.len(), 72 + 4 + 4096 + 4);
        assert_eq!(v[3] as usize, 76, "PDO right after the header digest");
        let p = parse(&v, Receiver::Controller, Some(BOTH), &LIM).unwrap();
        let Header::CapsuleCmd(c) = p.header else { panic!() };
        assert_eq!(c.cmd.cid.get(), 7);
        assert_eq!(p.data, &data[..]);
        assert!(p.data_digest_ok);
        // Flip one data bit: the PDU parses, the data digest does not match.
        let mut bad = v.clone();
        bad[100] ^= 1;
        assert!(!parse(&bad, Receiver::Controller, Some(BOTH), &LIM).unwrap().data_digest_ok);
        // Flip one header bit: header digest error.
        let mut bad = v.clone();
        bad[10] ^= 1;
        let e = parse(&bad, Receiver::Controller, Some(BOTH), &LIM).unwrap_err();
        assert!(matches!(e, PduError::HeaderDigest { .. }), "{e}");
        assert_eq!(e.fes(), fes::HEADER_DIGEST);
        // Digest flags must match what was negotiated.
        let e = parse(&v, Receiver::Controller, Some(Digests::default()), &LIM).unwrap_err();
        assert_eq!((e.fes(), e.fei()), (fes::INVALID_HEADER, 1));
        // More in-capsule data than the limit.
        let big = capsule(Digests::default(), &vec![0; 8196]);
        let e = parse(&big, Receiver::Controller, Some(Digests::default()), &LIM).unwrap_err();
        assert_eq!(e, PduError::DataLimit { len: 8196, max: 8192 });
    }

    #[test]
    fn capsule_without_data() {
        let v = capsule(Digests::default(), &[]);
        assert_eq!(v.len(), 72);
        assert_eq!((v[2], v[3]), (72, 0));
        let p = parse(&v, Receiver::Controller, Some(Digests::default()), &LIM).unwrap();
        assert!(p.data.is_empty());
        // PDO set without data.
        let mut bad = v.clone();
        bad[3] = 72;
        let e = parse(&bad, Receiver::Controller, Some(Digests::default()), &LIM).unwrap_err();
        assert_eq!(e.fei(), 3);
        // Truncated.
        assert!(matches!(
            parse(&v[..50], Receiver::Controller, Some(Digests::default()), &LIM),
            Err(PduError::Truncated { .. })
        ));
    }

    #[test]
    fn h2c_data_checks_datal_against_plen() {
        let dg = Digests { header: false, data: true };
        let mut v = Vec::new();
        push_data_header(&mut v, dg, 0, false, 3, 9, 4096, 512, true);
        v.extend_from_slice(&[0x5a; 512]);
        v.extend_from_slice(&crc(&[0x5a; 512]).to_le_bytes());
        let p = parse(&v, Receiver::Controller, Some(dg), &LIM).unwrap();
        let Header::H2cData(d) = p.header else { panic!() };
        assert_eq!((d.cccid.get(), d.ttag.get(), d.datao.get(), d.datal.get()), (3, 9, 4096, 512));
        assert_eq!(d.hdr.flags & flags::LAST_PDU, flags::LAST_PDU);
        let mut bad = v.clone();
        bad[16] = 1; // DATAL 513 with PLEN for 512
        assert_eq!(parse(&bad, Receiver::Controller, Some(dg), &LIM).unwrap_err().fei(), 16);
        // The host never receives H2CData; the controller never receives C2HData.
        let mut c2h = Vec::new();
        push_data_header(&mut c2h, dg, 0, true, 3, 0, 0, 4, true);
        assert_eq!(
            check_common(c2h[..8].try_into().unwrap(), Receiver::Controller, Some(dg), &LIM).unwrap_err(),
            PduError::BadType(pdu_type::C2H_DATA)
        );
    }

    #[test]
    fn c2h_data_padding_follows_hpda() {
        let dg = Digests { header: true, data: false };
        let mut v = Vec::new();
        push_data_header(&mut v, dg, 7, true, 1, 0, 0, 64, true); // 32-byte alignment
        assert_eq!(v.len(), 32);
        assert_eq!(v[3], 32);
        v.extend_from_slice(&[1; 64]);
        let p = parse(&v, Receiver::Host, Some(dg), &LIM).unwrap();
        assert_eq!(p.data, &[1; 64][..]);
    }

    #[test]
    fn r2t_resp_and_term_req() {
        let mut v = Vec::new();
        push_r2t(&mut v, BOTH, 5, 2, 8192, 65536);
        push_capsule_resp(
            &mut v,
            BOTH,
            NvmeCqe { cid: U16::new(5), status: U16::new(2 << 1), ..Default::default() },
        );
        push_term_req(&mut v, true, fes::HEADER_DIGEST, 0, &[0xee; 200]);
        let p = parse(&v, Receiver::Host, Some(BOTH), &LIM).unwrap();
        assert!(matches!(p.header, Header::R2t(r) if r.r2tl.get() == 65536 && r.ttag.get() == 2));
        let rest = &v[p.layout.plen()..];
        let p = parse(rest, Receiver::Host, Some(BOTH), &LIM).unwrap();
        assert!(matches!(p.header, Header::CapsuleResp(r) if r.cqe.status.get() == 4));
        let rest = &rest[p.layout.plen()..];
        let p = parse(rest, Receiver::Host, Some(BOTH), &LIM).unwrap();
        let Header::C2hTermReq(t) = p.header else { panic!() };
        assert_eq!(t.fes.get(), fes::HEADER_DIGEST);
        assert_eq!(p.data.len(), TERM_MAX_DATA);
        assert_eq!(p.layout.plen(), rest.len());
    }

    fn valid_pdus() -> Vec<Vec<u8>> {
        let mut all =
            vec![ic_req(BOTH, 0, 0).as_bytes().to_vec(), capsule(BOTH, &[9; 300]), capsule(BOTH, &[])];
        let mut v = Vec::new();
        push_data_header(&mut v, BOTH, 0, false, 3, 9, 0, 16, true);
        v.extend_from_slice(&[7; 16]);
        v.extend_from_slice(&crc(&[7; 16]).to_le_bytes());
        all.push(v);
        let mut v = Vec::new();
        push_term_req(&mut v, false, 1, 2, &[1; 30]);
        all.push(v);
        all
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Random bytes: parsing never panics; it gives a PDU whose parts fit in the buffer,
        /// or a typed error with a valid fatal error status.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400),
                                    dg in 0u8..5, host in any::<bool>()) {
            let dg = if dg == 4 { None } else { Some(Digests::from_bits(dg)) };
            let rx = if host { Receiver::Host } else { Receiver::Controller };
            match parse(&bytes, rx, dg, &LIM) {
                Ok(p) => prop_assert!(p.layout.plen() <= bytes.len()),
                Err(e) => prop_assert!((1..=6).contains(&e.fes())),
            }
        }

        /// Valid PDUs with bytes changed, truncated or extended: never a panic, and any header
        /// bit flipped under a header digest is caught.
        #[test]
        fn mutated_pdus_never_panic(which in 0usize..5, edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
                                    cut in proptest::option::of(any::<usize>())) {
            let mut pdu = valid_pdus()[which].clone();
            let dg = if which == 0 { None } else { Some(BOTH) };
            prop_assert!(parse(&pdu, Receiver::Controller, dg, &LIM).is_ok());
            for (at, x) in &edits {
                let i = at % pdu.len();
                pdu[i] ^= x;
            }
            if let Some(c) = cut {
                pdu.truncate(c % (pdu.len() + 1));
            }
            match parse(&pdu, Receiver::Controller, dg, &LIM) {
                Ok(p) => prop_assert!(p.layout.plen() <= pdu.len()),
                Err(e) => prop_assert!((1..=6).contains(&e.fes())),
            }
        }
    }
}
