//! A minimal blocking NVMe/TCP initiator, for tests and diagnostics: connects a queue,
//! negotiates digests, sends commands (writes in-capsule or after R2T, split into H2CData PDUs
//! of at most the controller's MAXH2CDATA) and collects C2HData and responses, several commands
//! in flight at once.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromZeros, IntoBytes};

use crate::ctrl::{admin_op, fctype};
use crate::pdu::{self, sgl, Digests, Header, Limits, NvmeCmd, NvmeCqe, PduError, Receiver};

/// Initiator errors.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// Socket error.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The controller sent a malformed PDU.
    #[error("bad PDU from the controller: {0}")]
    Pdu(#[from] PduError),
    /// The controller terminated the connection.
    #[error("controller sent C2HTermReq, fatal error status {fes:#x}, info {fei}")]
    Terminated {
        /// Fatal error status.
        fes: u16,
        /// Fatal error information.
        fei: u32,
    },
    /// The controller did something the protocol does not allow.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A command failed.
    #[error("command failed with status {0:#x}")]
    Status(u16),
}

/// What a queue connection asks for.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Subsystem NQN.
    pub subnqn: String,
    /// Host NQN.
    pub hostnqn: String,
    /// Queue id (0: admin).
    pub qid: u16,
    /// Controller id (0xffff for a new admin queue).
    pub cntlid: u16,
    /// SQSIZE (0-based).
    pub sqsize: u16,
    /// Keep alive timeout, ms (admin queue).
    pub kato_ms: u32,
    /// Digests to ask for.
    pub digests: Digests,
    /// Most in-capsule write data (from the controller's IOCCSZ; 0: always R2T, the Connect's
    /// data too).
    pub in_capsule: usize,
    /// Host identifier (the same on every queue of a controller).
    pub hostid: [u8; 16],
}

struct Pending {
    write: Option<Vec<u8>>,
    read: Vec<u8>,
    got: usize,
}

/// One connected queue.
pub struct Initiator {
    s: TcpStream,
    dg: Digests,
    /// The controller id Connect returned.
    pub cntlid: u16,
    /// The longest R2T the controller sent (R2TL).
    pub longest_r2t: u32,
    maxh2c: usize,
    in_capsule: usize,
    next_cid: u16,
    pending: HashMap<u16, Pending>,
}

/// A finished command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    /// Its completion.
    pub cqe: NvmeCqe,
    /// Data the controller sent.
    pub data: Vec<u8>,
}

impl Done {
    /// Status without the phase bit.
    pub fn status(&self) -> u16 {
        self.cqe.status.get() >> 1
    }
}

impl Initiator {
    /// Connects, exchanges ICReq/ICResp and sends Connect.
    pub fn connect(addr: SocketAddr, o: &ConnectOptions) -> Result<Self, InitError> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut me = Self {
            s,
            dg: o.digests,
            cntlid: 0,
            longest_r2t: 0,
            maxh2c: 0,
            in_capsule: 0,
            next_cid: 1,
            pending: HashMap::new(),
        };
        me.s.write_all(pdu::ic_req(o.digests, 0, 0).as_bytes())?;
        let (h, _) = me.read_pdu(None)?;
        let Header::IcResp(r) = h else {
            return Err(InitError::Protocol(format!("expected ICResp, got {h:?}")));
        };
        if Digests::from_bits(r.digest) != o.digests || r.hpda_cpda != 0 || r.max.get() < 4096 {
            return Err(InitError::Protocol(format!("ICResp not acceptable: {r:?}")));
        }
        me.maxh2c = r.max.get() as usize;
        let mut c = NvmeCmd::new_zeroed();
        c.opcode = admin_op::FABRICS;
        let b = c.as_mut_bytes();
        b[4] = fctype::CONNECT;
        b[42..44].copy_from_slice(&o.qid.to_le_bytes());
        b[44..46].copy_from_slice(&o.sqsize.to_le_bytes());
        b[48..52].copy_from_slice(&o.kato_ms.to_le_bytes());
        let mut data = vec![0u8; 1024];
        data[..16].copy_from_slice(&o.hostid);
        data[16..18].copy_from_slice(&o.cntlid.to_le_bytes());
        data[256..256 + o.subnqn.len()].copy_from_slice(o.subnqn.as_bytes());
        data[512..512 + o.hostnqn.len()].copy_from_slice(o.hostnqn.as_bytes());
        // (`in_capsule` 0: even the Connect data goes after an R2T.)
        me.in_capsule = if o.in_capsule == 0 { 0 } else { 8192 };
        let d = me.run(c, Some(data), 0)?;
        if d.status() != 0 {
            return Err(InitError::Status(d.status()));
        }
        me.cntlid = d.cqe.result.get() as u16;
        me.in_capsule = o.in_capsule;
        Ok(me)
    }

    fn read_exact(&mut self, n: usize) -> Result<Vec<u8>, InitError> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v)?;
        Ok(v)
    }

    fn read_pdu(&mut self, dg: Option<Digests>) -> Result<(Header, Vec<u8>), InitError> {
        let mut buf = self.read_exact(pdu::COMMON_LEN)?;
        let limits = Limits { max_in_capsule: 0, max_data_pdu: 1 << 24 };
        let layout = pdu::check_common(buf[..8].try_into().unwrap(), Receiver::Host, dg, &limits)?;
        let rest = self.read_exact(layout.plen() - pdu::COMMON_LEN)?;
        buf.extend_from_slice(&rest);
        let p = pdu::parse(&buf, Receiver::Host, dg, &limits)?;
        if !p.data_digest_ok {
            return Err(InitError::Protocol("C2HData digest mismatch".into()));
        }
        if let Header::C2hTermReq(t) = p.header {
            return Err(InitError::Terminated { fes: t.fes.get(), fei: t.fei.get() });
        }
        Ok((p.header, p.data.to_vec()))
    }

    /// Sends a command: `write` is host data (in-capsule when it fits, else sent on R2T),
    /// `read_len` the bytes the controller will send. Returns its command id.
    pub fn submit(
        &mut self,
        mut c: NvmeCmd,
        write: Option<Vec<u8>>,
        read_len: usize,
    ) -> Result<u16, InitError> {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1).max(1);
        c.cid = U16::new(cid);
        let mut out = Vec::new();
        let inline = write.as_ref().is_some_and(|w| w.len() <= self.in_capsule);
        match &write {
            Some(w) if inline => {
                c.sgl_type = sgl::IN_CAPSULE;
                c.sgl_addr = U64::new(0);
                c.sgl_len = U32::new(w.len() as u32);
                pdu::push_capsule_cmd(&mut out, self.dg, c, w.len());
                out.extend_from_slice(w);
                if self.dg.data {
                    out.extend_from_slice(&pdu::crc(w).to_le_bytes());
                }
            }
            Some(w) => {
                c.sgl_type = sgl::TRANSPORT;
                c.sgl_len = U32::new(w.len() as u32);
                pdu::push_capsule_cmd(&mut out, self.dg, c, 0);
            }
            None => {
                c.sgl_type = sgl::TRANSPORT;
                c.sgl_len = U32::new(read_len as u32);
                pdu::push_capsule_cmd(&mut out, self.dg, c, 0);
            }
        }
        self.s.write_all(&out)?;
        let write = if inline { None } else { write };
        self.pending.insert(cid, Pending { write, read: vec![0; read_len], got: 0 });
        Ok(cid)
    }

    /// Handles PDUs until a command completes; returns it with its id.
    pub fn complete(&mut self) -> Result<(u16, Done), InitError> {
        loop {
            let (h, data) = self.read_pdu(Some(self.dg))?;
            match h {
                Header::R2t(r) => {
                    let cid = r.cccid.get();
                    let p = self
                        .pending
                        .get(&cid)
                        .ok_or_else(|| InitError::Protocol(format!("R2T for {cid}")))?;
                    let w = p.write.as_ref().ok_or_else(|| InitError::Protocol("R2T for no data".into()))?;
                    self.longest_r2t = self.longest_r2t.max(r.r2tl.get());
                    let (mut off, end) = (r.r2to.get() as usize, (r.r2to.get() + r.r2tl.get()) as usize);
                    if end > w.len() {
                        return Err(InitError::Protocol("R2T beyond the data".into()));
                    }
                    let mut out = Vec::new();
                    while off < end {
                        let n = (end - off).min(self.maxh2c);
                        let chunk = &w[off..off + n];
                        pdu::push_data_header(
                            &mut out,
                            self.dg,
                            0,
                            false,
                            cid,
                            r.ttag.get(),
                            off as u32,
                            n as u32,
                            off + n == end,
                        );
                        out.extend_from_slice(chunk);
                        if self.dg.data {
                            out.extend_from_slice(&pdu::crc(chunk).to_le_bytes());
                        }
                        off += n;
                    }
                    self.s.write_all(&out)?;
                }
                Header::C2hData(d) => {
                    let cid = d.cccid.get();
                    let p = self
                        .pending
                        .get_mut(&cid)
                        .ok_or_else(|| InitError::Protocol(format!("C2HData for {cid}")))?;
                    let at = d.datao.get() as usize;
                    if at + data.len() > p.read.len() {
                        return Err(InitError::Protocol("C2HData beyond the command".into()));
                    }
                    p.read[at..at + data.len()].copy_from_slice(&data);
                    p.got += data.len();
                }
                Header::CapsuleResp(r) => {
                    let cid = r.cqe.cid.get();
                    let p = self
                        .pending
                        .remove(&cid)
                        .ok_or_else(|| InitError::Protocol(format!("response for {cid}")))?;
                    let mut data = p.read;
                    data.truncate(p.got);
                    return Ok((cid, Done { cqe: r.cqe, data }));
                }
                h => return Err(InitError::Protocol(format!("unexpected {h:?}"))),
            }
        }
    }

    /// Runs one command to completion.
    pub fn run(&mut self, c: NvmeCmd, write: Option<Vec<u8>>, read_len: usize) -> Result<Done, InitError> {
        let cid = self.submit(c, write, read_len)?;
        let (got, d) = self.complete()?;
        if got != cid {
            return Err(InitError::Protocol(format!("completion for {got}, expected {cid}")));
        }
        Ok(d)
    }

    /// Property Get.
    pub fn property_get(&mut self, offset: u32, eight: bool) -> Result<u64, InitError> {
        let mut c = NvmeCmd::new_zeroed();
        c.opcode = admin_op::FABRICS;
        let b = c.as_mut_bytes();
        b[4] = fctype::PROPERTY_GET;
        b[40] = u8::from(eight);
        b[44..48].copy_from_slice(&offset.to_le_bytes());
        let d = self.run(c, None, 0)?;
        if d.status() != 0 {
            return Err(InitError::Status(d.status()));
        }
        Ok(d.cqe.result.get())
    }

    /// Property Set (4 bytes).
    pub fn property_set(&mut self, offset: u32, value: u32) -> Result<(), InitError> {
        let mut c = NvmeCmd::new_zeroed();
        c.opcode = admin_op::FABRICS;
        let b = c.as_mut_bytes();
        b[4] = fctype::PROPERTY_SET;
        b[44..48].copy_from_slice(&offset.to_le_bytes());
        b[48..52].copy_from_slice(&value.to_le_bytes());
        let d = self.run(c, None, 0)?;
        if d.status() != 0 {
            return Err(InitError::Status(d.status()));
        }
        Ok(())
    }

    /// Sends raw bytes (for tests of bad input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), InitError> {
        self.s.write_all(bytes)?;
        Ok(())
    }

    /// Reads the next PDU, whatever it is (for tests of bad input).
    pub fn next_pdu(&mut self) -> Result<(Header, Vec<u8>), InitError> {
        self.read_pdu(Some(self.dg))
    }

    /// The socket.
    pub fn stream(&self) -> &TcpStream {
        &self.s
    }
}

/// A command with opcode, namespace and dwords 10 to 15.
pub fn command(opcode: u8, nsid: u32, cdw: [u32; 6]) -> NvmeCmd {
    let mut c = NvmeCmd::new_zeroed();
    c.opcode = opcode;
    c.nsid = U32::new(nsid);
    for (i, v) in cdw.into_iter().enumerate() {
        c.cdw[i] = U32::new(v);
    }
    c
}
