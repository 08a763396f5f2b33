//! What routers send each other for RDMA between hosts: binary frames on one TCP connection
//! from a router to each other host's router, on the verbs port (the peer port + 1,
//! [`VERBS_PORT_OFFSET`]).
//!
//! The connecting router is the requester of every frame it sends (requests of its QPs) and the
//! accepting router the responder (responses on the same connection), so each connection
//! carries requests one way and responses the other; two routers that both have QPs talking to
//! each other have two connections.
//!
//! A connection starts with the requester's [`Hello`] (16 bytes), answered by the responder's
//! [`HelloAnswer`] (16 bytes: which of its shards serves the connection, and how many it has,
//! so that the requester keeps one connection per destination shard), then frames: a 72-byte
//! [`FrameHeader`], little-endian, followed by `len` bytes of payload. Sequence numbers are per
//! QP (the requester's `sq_psn` counted up, the responder expecting its `rq_psn`): the
//! responder executes a QP's requests in order and answers each executed request, except that
//! consecutive acknowledgements of one QP coalesce into the last one (an [`FrameKind::Ack`] of
//! `seq` acknowledges every earlier request of that QP too). A request may carry an
//! acknowledgement the other way ([`FrameHeader::ack`]): the sending QP acknowledges the
//! receiving QP's requests up to that sequence number, as an ACK frame from it would, so that
//! a reply rides with the ACK of the request it answers.
//!
//! Decoding checks shapes only: a kind this version knows, a payload length the kind allows
//! and at most [`MAX_PAYLOAD`]. A receiver drops a connection whose frame does not decode.
//!
//! ```text
//!  0 kind u8   1 code u8   2 flags u8 (bit 0: ack present)   3 reserved   4 len u32
//!  8 src_ip [4]  12 dst_ip [4]  16 src_qpn u32  20 dst_qpn u32
//! 24 seq u32  28 rkey u32  32 imm u32  36 arg u32 (READ: length; RNR NAK: timer code)
//! 40 remote_addr u64  48 compare_add u64  56 swap u64  64 ack u32  68 reserved u32
//! ```

use std::net::Ipv4Addr;
use std::ops::Range;

/// The verbs port is the peer port plus this.
pub const VERBS_PORT_OFFSET: u16 = 1;
/// Bytes of a [`Hello`].
pub const HELLO_LEN: usize = 16;
/// Bytes of a [`HelloAnswer`].
pub const ANSWER_LEN: usize = 16;
/// Bytes of a [`FrameHeader`].
pub const HEADER_LEN: usize = 72;
/// The largest payload of a frame: the largest message that crosses hosts (larger ones fail at
/// the requester with IBV_WC_LOC_LEN_ERR).
pub const MAX_PAYLOAD: u32 = 16 << 20;

const MAGIC: [u8; 4] = *b"FFVR";
/// Version 2 added the destination address (bytes 12..16), version 3 the [`HelloAnswer`].
const VERSION: u16 = 3;

/// The first 16 bytes on a connection: magic `FFVR`, version, the sender's host address, and
/// the overlay address of a container whose QPs the connection's requests go to. The
/// responder believes the address the kernel reports, not the sender's; a mismatch drops the
/// connection. The destination picks the responder's shard that serves the connection (each
/// shard serves the QPs of its own containers), which the [`HelloAnswer`] names: the
/// connection then carries the requests to every container of that shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub host: Ipv4Addr,
    pub dst: Ipv4Addr,
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[8..12].copy_from_slice(&self.host.octets());
        b[12..16].copy_from_slice(&self.dst.octets());
        b
    }

    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Hello, FrameError> {
        if b[0..4] != MAGIC {
            return Err(FrameError::Magic);
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        Ok(Hello {
            host: Ipv4Addr::new(b[8], b[9], b[10], b[11]),
            dst: Ipv4Addr::new(b[12], b[13], b[14], b[15]),
        })
    }
}

/// The responder's first 16 bytes on a connection: magic `FFVR`, version, then (bytes 8..12)
/// the shard that serves the connection and the number of shards of the responder's router.
/// A container's QPs are served by shard `address mod shards`, so with it the requester
/// finds the connection for any other destination on that host, and opens one per
/// destination shard rather than per container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloAnswer {
    pub shard: u16,
    pub shards: u16,
}

impl HelloAnswer {
    pub fn encode(&self) -> [u8; ANSWER_LEN] {
        let mut b = [0u8; ANSWER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[8..10].copy_from_slice(&self.shard.to_le_bytes());
        b[10..12].copy_from_slice(&self.shards.to_le_bytes());
        b
    }

    /// Decodes and checks that the shard is one of the router's.
    pub fn decode(b: &[u8; ANSWER_LEN]) -> Result<HelloAnswer, FrameError> {
        if b[0..4] != MAGIC {
            return Err(FrameError::Magic);
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        let shard = u16::from_le_bytes([b[8], b[9]]);
        let shards = u16::from_le_bytes([b[10], b[11]]);
        if shard >= shards {
            return Err(FrameError::Shard { shard, shards });
        }
        Ok(HelloAnswer { shard, shards })
    }
}

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Send = 1,
    SendWithImm = 2,
    Write = 3,
    WriteWithImm = 4,
    /// RDMA READ of `arg` bytes.
    Read = 5,
    CompareSwap = 6,
    FetchAdd = 7,
    /// A UD datagram (its payload the message), never answered: `rkey` is the qkey it
    /// carries (the sender QP's own if the work request's was privileged), `code` is 1 with
    /// immediate data in `imm`, `arg` the sender's address handle's traffic class (bits 0..8),
    /// hop limit (8..16) and service level (16..24); `seq` is unused. The responder delivers it
    /// with the checks of one host or drops it.
    Datagram = 8,
    /// The request `seq` (and every earlier one of the QP) executed.
    Ack = 0x81,
    /// The data of the READ `seq`.
    ReadData = 0x82,
    /// The original value of the atomic `seq` (8 bytes, host order).
    AtomicData = 0x83,
    /// The request `seq` was not executed: `code` says why ([`nak`]); earlier ones were.
    Nak = 0x84,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<FrameKind> {
        use FrameKind::*;
        Some(match v {
            1 => Send,
            2 => SendWithImm,
            3 => Write,
            4 => WriteWithImm,
            5 => Read,
            6 => CompareSwap,
            7 => FetchAdd,
            8 => Datagram,
            0x81 => Ack,
            0x82 => ReadData,
            0x83 => AtomicData,
            0x84 => Nak,
            _ => return None,
        })
    }

    /// Whether a requester sends it (a responder sends the others).
    pub fn is_request(self) -> bool {
        (self as u8) < 0x80
    }

    /// Whether its payload may have any length (up to [`MAX_PAYLOAD`]); the others have a
    /// fixed one ([`FrameKind::fixed_len`]).
    fn carries_data(self) -> bool {
        matches!(
            self,
            FrameKind::Send
                | FrameKind::SendWithImm
                | FrameKind::Write
                | FrameKind::WriteWithImm
                | FrameKind::ReadData
                | FrameKind::Datagram
        )
    }

    fn fixed_len(self) -> u32 {
        if self == FrameKind::AtomicData {
            8
        } else {
            0
        }
    }
}

/// Why a responder did not execute a request (the `code` of a [`FrameKind::Nak`]).
pub mod nak {
    /// Receiver Not Ready: no receive posted; retry after the timer code in `arg`.
    pub const RNR: u8 = 1;
    /// The destination QP is missing, not ready, not connected back, or not the source's
    /// tenant's: the requester retries after its ACK timeout (what a lost packet looks like).
    pub const NOT_READY: u8 = 2;
    /// The responder's completion queue is full: retry shortly, without counting a retry.
    pub const BUSY: u8 = 3;
    /// Fatal: IBV_WC_REM_ACCESS_ERR at the requester.
    pub const REM_ACCESS: u8 = 4;
    /// Fatal: IBV_WC_REM_INV_REQ_ERR.
    pub const REM_INV_REQ: u8 = 5;
    /// Fatal: IBV_WC_REM_OP_ERR.
    pub const REM_OP: u8 = 6;
}

/// The fixed part of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub code: u8,
    pub len: u32,
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub src_qpn: u32,
    pub dst_qpn: u32,
    pub seq: u32,
    pub rkey: u32,
    pub imm: u32,
    pub arg: u32,
    pub remote_addr: u64,
    pub compare_add: u64,
    pub swap: u64,
    /// On a request: the sending QP acknowledges the receiving QP's requests up to and
    /// including this sequence number (an ACK riding on the request).
    pub ack: Option<u32>,
}

/// Bit 0 of the flags byte: [`FrameHeader::ack`] is present.
const FLAG_ACK: u8 = 1;

/// A frame or hello that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("not a Freeflow verbs connection (bad magic)")]
    Magic,
    #[error("verbs transport version {0} (this router speaks {VERSION})")]
    Version(u16),
    #[error("an answer naming shard {shard} of {shards}")]
    Shard { shard: u16, shards: u16 },
    #[error("unknown frame kind {0:#x}")]
    Kind(u8),
    #[error("frame of kind {kind:?} with {len} bytes of payload")]
    Length { kind: FrameKind, len: u32 },
    #[error("frame of kind {kind:?} with flags {flags:#x}")]
    Flags { kind: FrameKind, flags: u8 },
}

fn u32_at(b: &[u8; HEADER_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; HEADER_LEN], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn ip_at(b: &[u8; HEADER_LEN], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

impl FrameHeader {
    /// A header of `kind` with every other field zero.
    pub fn new(kind: FrameKind) -> FrameHeader {
        FrameHeader {
            kind,
            code: 0,
            len: 0,
            src_ip: Ipv4Addr::UNSPECIFIED,
            dst_ip: Ipv4Addr::UNSPECIFIED,
            src_qpn: 0,
            dst_qpn: 0,
            seq: 0,
            rkey: 0,
            imm: 0,
            arg: 0,
            remote_addr: 0,
            compare_add: 0,
            swap: 0,
            ack: None,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.kind as u8;
        b[1] = self.code;
        if let Some(ack) = self.ack {
            b[2] = FLAG_ACK;
            b[64..68].copy_from_slice(&ack.to_le_bytes());
        }
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..12].copy_from_slice(&self.src_ip.octets());
        b[12..16].copy_from_slice(&self.dst_ip.octets());
        for (at, v) in [
            (16, self.src_qpn),
            (20, self.dst_qpn),
            (24, self.seq),
            (28, self.rkey),
            (32, self.imm),
            (36, self.arg),
        ] {
            b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        for (at, v) in [
            (40, self.remote_addr),
            (48, self.compare_add),
            (56, self.swap),
        ] {
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Decodes and checks the shape (kind, payload length).
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<FrameHeader, FrameError> {
        let kind = FrameKind::from_u8(b[0]).ok_or(FrameError::Kind(b[0]))?;
        let len = u32_at(b, 4);
        let fits = if kind.carries_data() {
            len <= MAX_PAYLOAD
        } else {
            len == kind.fixed_len()
        };
        if !fits {
            return Err(FrameError::Length { kind, len });
        }
        // Only a request of a connected QP carries an acknowledgement.
        let flags = b[2];
        let ack_allowed = kind.is_request() && kind != FrameKind::Datagram;
        if flags & !FLAG_ACK != 0 || (flags & FLAG_ACK != 0 && !ack_allowed) {
            return Err(FrameError::Flags { kind, flags });
        }
        Ok(FrameHeader {
            kind,
            code: b[1],
            len,
            src_ip: ip_at(b, 8),
            dst_ip: ip_at(b, 12),
            src_qpn: u32_at(b, 16),
            dst_qpn: u32_at(b, 20),
            seq: u32_at(b, 24),
            rkey: u32_at(b, 28),
            imm: u32_at(b, 32),
            arg: u32_at(b, 36),
            remote_addr: u64_at(b, 40),
            compare_add: u64_at(b, 48),
            swap: u64_at(b, 56),
            ack: (flags & FLAG_ACK != 0).then(|| u32_at(b, 64)),
        })
    }
}

/// The first frame of `received`, the bytes of a connection after its hello: `Ok(None)` while
/// it is incomplete, else its header and where its payload lies in `received` (the next frame
/// starts at the range's end). Err: the header does not decode, and the connection must go.
pub fn split_frame(received: &[u8]) -> Result<Option<(FrameHeader, Range<usize>)>, FrameError> {
    let Some(b) = received.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let h = FrameHeader::decode(b)?;
    // At most 72 + 16 MiB: no overflow, even on 32-bit targets.
    let end = HEADER_LEN + h.len as usize;
    if end > received.len() {
        return Ok(None);
    }
    Ok(Some((h, HEADER_LEN..end)))
}

/// Whether sequence number `a` comes before `b` (serial number arithmetic: they wrap).
pub fn seq_before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_at_fixed_offsets() {
        let h = FrameHeader {
            kind: FrameKind::Read,
            code: 0,
            len: 0,
            src_ip: Ipv4Addr::new(10, 32, 0, 2),
            dst_ip: Ipv4Addr::new(10, 32, 0, 4),
            src_qpn: 0x123456,
            dst_qpn: 0x654321,
            seq: 7,
            rkey: 0xdead_beef,
            imm: 9,
            arg: 4096,
            remote_addr: 0x7f00_0000_1000,
            compare_add: 1,
            swap: 2,
            ack: None,
        };
        let b = h.encode();
        assert_eq!(b[0], 5);
        assert_eq!(&b[8..12], &[10, 32, 0, 2]);
        assert_eq!(u32_at(&b, 36), 4096);
        assert_eq!(u64_at(&b, 40), 0x7f00_0000_1000);
        assert_eq!(FrameHeader::decode(&b), Ok(h));
        let carrying = FrameHeader { ack: Some(41), ..h };
        let b = carrying.encode();
        assert_eq!((b[2], u32_at(&b, 64)), (1, 41));
        assert_eq!(FrameHeader::decode(&b), Ok(carrying));
    }

    #[test]
    fn only_requests_of_connected_qps_carry_an_ack() {
        for kind in [FrameKind::Ack, FrameKind::Nak, FrameKind::Datagram] {
            let mut b = FrameHeader::new(kind).encode();
            b[2] = 1;
            assert!(matches!(
                FrameHeader::decode(&b),
                Err(FrameError::Flags { .. })
            ));
        }
        let mut b = FrameHeader::new(FrameKind::Send).encode();
        b[2] = 2;
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(FrameError::Flags { .. })
        ));
    }

    #[test]
    fn bad_shapes_do_not_decode() {
        let mut b = FrameHeader::new(FrameKind::Write).encode();
        b[4..8].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(FrameError::Length { .. })
        ));
        let mut b = FrameHeader::new(FrameKind::Ack).encode();
        b[4] = 1;
        assert!(FrameHeader::decode(&b).is_err());
        let mut b = FrameHeader::new(FrameKind::AtomicData).encode();
        assert!(FrameHeader::decode(&b).is_err());
        b[4] = 8;
        assert!(FrameHeader::decode(&b).is_ok());
        b[0] = 0x42;
        assert_eq!(FrameHeader::decode(&b), Err(FrameError::Kind(0x42)));
    }

    #[test]
    fn hellos_carry_magic_version_and_host() {
        let h = Hello {
            host: Ipv4Addr::new(192, 168, 1, 2),
            dst: Ipv4Addr::new(10, 0, 0, 7),
        };
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
        let mut b = h.encode();
        b[4] = 2;
        assert_eq!(Hello::decode(&b), Err(FrameError::Version(2)));
        b[0] = b'X';
        assert_eq!(Hello::decode(&b), Err(FrameError::Magic));
    }

    #[test]
    fn answers_name_one_of_the_routers_shards() {
        let a = HelloAnswer {
            shard: 1,
            shards: 2,
        };
        assert_eq!(HelloAnswer::decode(&a.encode()), Ok(a));
        for (shard, shards) in [(2, 2), (0, 0)] {
            assert_eq!(
                HelloAnswer::decode(&HelloAnswer { shard, shards }.encode()),
                Err(FrameError::Shard { shard, shards })
            );
        }
        let mut b = a.encode();
        b[4] = 2;
        assert_eq!(HelloAnswer::decode(&b), Err(FrameError::Version(2)));
    }

    #[test]
    fn frames_split_only_when_whole() {
        let mut w = FrameHeader::new(FrameKind::Write);
        w.len = 5;
        let mut bytes = w.encode().to_vec();
        bytes.extend_from_slice(b"hello");
        bytes.extend_from_slice(&FrameHeader::new(FrameKind::Ack).encode());
        for cut in 0..HEADER_LEN + 5 {
            assert_eq!(split_frame(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        let (h, payload) = split_frame(&bytes).unwrap().unwrap();
        assert_eq!((h, &bytes[payload.clone()]), (w, &b"hello"[..]));
        let (h, payload) = split_frame(&bytes[payload.end..]).unwrap().unwrap();
        assert_eq!((h.kind, payload), (FrameKind::Ack, HEADER_LEN..HEADER_LEN));
        bytes[HEADER_LEN + 5] = 0x42;
        assert_eq!(
            split_frame(&bytes[HEADER_LEN + 5..]),
            Err(FrameError::Kind(0x42))
        );
    }

    #[test]
    fn sequence_numbers_compare_across_the_wrap() {
        assert!(seq_before(1, 2));
        assert!(!seq_before(2, 2));
        assert!(seq_before(u32::MAX, 0));
        assert!(!seq_before(0, u32::MAX));
    }
}
