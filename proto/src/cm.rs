//! The connection manager's messages (rdma_cm over Freeflow): what Freeflow's `librdmacm.so.1`
//! and the router say to each other on `router.sock`.
//!
//! A process talks to the router's connection manager on two kinds of attach connections
//! (SOCK_SEQPACKET, identity from the kernel as for every attach):
//! - a **requests** connection ([`crate::attach::ShimKind::CmRequests`]), one per process:
//!   [`CmRecord`]s with [`REQUEST`] magic, each answered by one with [`REPLY`] magic and the
//!   same `seq`;
//! - one **event channel** connection per `rdma_event_channel`
//!   ([`crate::attach::ShimKind::CmChannel`]): the router writes only events on it, so its
//!   descriptor is the channel's `fd` itself (poll, epoll and O_NONBLOCK work as on a real
//!   channel). Its first message is [`CHANNEL_TOKEN`], carrying the random token by which the
//!   process's requests name the channel (`CreateId`); the router accepts a token only from
//!   the container that holds the channel.
//!
//! Every record is [`CM_RECORD_LEN`] bytes, little-endian, whatever it carries; anything else is
//! malformed. Decoding checks shapes (length, magic, op, private data length); the router checks
//! meaning (the id's owner, the addresses' tenant, states, private data per op).

use crate::codec::{self, exact, expect_magic, wire_enum, DecodeError};
use std::net::{Ipv4Addr, SocketAddrV4};

/// Bytes of every record.
pub const CM_RECORD_LEN: usize = 320;
/// Most private data a record carries (the most any CM message allows is 196, in an accept).
pub const MAX_PRIVATE_DATA: usize = 256;

/// Magic of a request (shim to router).
pub const REQUEST: [u8; 4] = *b"FFCQ";
/// Magic of a reply (router to shim, on the requests connection).
pub const REPLY: [u8; 4] = *b"FFCR";
/// Magic of an event (router to shim, on an event channel).
pub const EVENT: [u8; 4] = *b"FFCE";

/// Private data rdma_cm allows per message on InfiniBand and RoCE (the CM's payload less the
/// 36-byte header rdma_cm puts in front of a connect's), as `rdma_connect(3)` documents.
pub mod private_data_limit {
    pub const CONNECT: usize = 56;
    pub const ACCEPT: usize = 196;
    pub const REJECT: usize = 148;
    /// RDMA_PS_UDP: a SIDR request's and reply's private data, less rdma_cm's header.
    pub const UD_CONNECT: usize = 180;
    pub const UD_ACCEPT: usize = 136;
}

wire_enum! {
    /// What a request asks for.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum CmOp: u16, from u16 {
        /// A new id on the channel named by `token`, in port space `ps`; reply: `id`.
        CreateId = 1,
        DestroyId = 2,
        /// Bind `id` to `local` (address 0: the container's own; port 0: one chosen by the
        /// router); reply: `local` as bound.
        Bind = 3,
        /// Listen on the bound `id`, at most `backlog` requests waiting.
        Listen = 4,
        /// Resolve `remote` (from `local` if its address is not 0); event ADDR_RESOLVED or
        /// ADDR_ERROR (an address the router does not know yet is waited for, at most the
        /// program's timeout in milliseconds, carried in `backlog`); reply: `local` as bound.
        ResolveAddr = 5,
        /// Event ROUTE_RESOLVED.
        ResolveRoute = 6,
        /// Connect to the resolved address with QP `qpn`, `conn` and private data.
        Connect = 7,
        /// Accept a connection request with QP `qpn` (its QP is ready to receive).
        Accept = 8,
        /// Reject a connection request, with private data.
        Reject = 9,
        /// The active side's QP is ready to send (after CONNECT_RESPONSE): both sides get
        /// ESTABLISHED.
        Establish = 10,
        /// Both sides get DISCONNECTED.
        Disconnect = 11,
    }
}

/// `enum rdma_cm_event_type` (rdma_cma.h), the events the router delivers.
pub mod event {
    pub const ADDR_RESOLVED: u16 = 0;
    pub const ADDR_ERROR: u16 = 1;
    pub const ROUTE_RESOLVED: u16 = 2;
    pub const ROUTE_ERROR: u16 = 3;
    pub const CONNECT_REQUEST: u16 = 4;
    pub const CONNECT_RESPONSE: u16 = 5;
    pub const CONNECT_ERROR: u16 = 6;
    pub const UNREACHABLE: u16 = 7;
    pub const REJECTED: u16 = 8;
    pub const ESTABLISHED: u16 = 9;
    pub const DISCONNECTED: u16 = 10;
    pub const DEVICE_REMOVAL: u16 = 11;
    pub const TIMEWAIT_EXIT: u16 = 15;
    /// Not an rdma_cm event: the first message on a channel, carrying its token.
    pub const CHANNEL_TOKEN: u16 = 0x100;
    /// Largest value a record's op may hold as an event.
    pub const LAST: u16 = CHANNEL_TOKEN;
}
pub use event::CHANNEL_TOKEN;

/// `enum rdma_port_space` values Freeflow serves.
pub mod port_space {
    pub const IPOIB: u16 = 0x0002;
    pub const TCP: u16 = 0x0106;
    pub const UDP: u16 = 0x0111;
    pub const IB: u16 = 0x013f;
}

/// Reject reasons (`status` of REJECTED), from the InfiniBand CM (`enum ib_cm_rej_reason`).
pub mod reject_reason {
    /// Nobody listens on the destination's port.
    pub const INVALID_SERVICE_ID: i32 = 8;
    /// The application rejected (`rdma_reject`).
    pub const CONSUMER_DEFINED: i32 = 28;
}

/// The parameters of a connection (`struct rdma_conn_param` less the private data).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnParams {
    pub responder_resources: u8,
    pub initiator_depth: u8,
    pub flow_control: u8,
    pub retry_count: u8,
    pub rnr_retry_count: u8,
    pub srq: u8,
}

/// One message of the connection manager: a request, a reply or an event (by its magic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmRecord {
    /// A [`CmOp`] in requests and replies, an [`event`] in events.
    pub op: u16,
    pub ps: u16,
    /// Chosen by the shim, echoed in the reply.
    pub seq: u32,
    pub id: u32,
    /// An event's listening id (CONNECT_REQUEST).
    pub other_id: u32,
    /// 0, or a positive errno (replies), or an event's status (negative errno or a reject
    /// reason).
    pub status: i32,
    pub local: SocketAddrV4,
    pub remote: SocketAddrV4,
    pub qpn: u32,
    /// A listen's backlog; a resolve's timeout in milliseconds.
    pub backlog: u32,
    pub conn: ConnParams,
    pub token: u64,
    pub private_data: Vec<u8>,
}

mod field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const OP: Range<usize> = 4..6;
    pub const PS: Range<usize> = 6..8;
    pub const SEQ: Range<usize> = 8..12;
    pub const ID: Range<usize> = 12..16;
    pub const OTHER_ID: Range<usize> = 16..20;
    pub const STATUS: Range<usize> = 20..24;
    pub const LOCAL_IP: Range<usize> = 24..28;
    pub const LOCAL_PORT: Range<usize> = 28..30;
    pub const REMOTE_IP: Range<usize> = 32..36;
    pub const REMOTE_PORT: Range<usize> = 36..38;
    pub const QPN: Range<usize> = 40..44;
    pub const BACKLOG: Range<usize> = 44..48;
    pub const CONN: Range<usize> = 48..54;
    pub const PRIVATE_LEN: Range<usize> = 54..56;
    pub const TOKEN: Range<usize> = 56..64;
    pub const PRIVATE: Range<usize> = 64..320;
}

impl Default for CmRecord {
    fn default() -> CmRecord {
        CmRecord {
            op: 0,
            ps: 0,
            seq: 0,
            id: 0,
            other_id: 0,
            status: 0,
            local: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
            remote: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
            qpn: 0,
            backlog: 0,
            conn: ConnParams::default(),
            token: 0,
            private_data: Vec::new(),
        }
    }
}

impl CmRecord {
    /// A request.
    pub fn request(op: CmOp, id: u32) -> CmRecord {
        CmRecord {
            op: op as u16,
            id,
            ..CmRecord::default()
        }
    }

    /// An event on `id`.
    pub fn event(kind: u16, id: u32, status: i32) -> CmRecord {
        CmRecord {
            op: kind,
            id,
            status,
            ..CmRecord::default()
        }
    }

    /// Encodes with `magic` ([`REQUEST`], [`REPLY`] or [`EVENT`]). Private data beyond
    /// [`MAX_PRIVATE_DATA`] is cut (the shim refuses longer data before it gets here).
    pub fn encode(&self, magic: [u8; 4]) -> [u8; CM_RECORD_LEN] {
        let mut b = [0u8; CM_RECORD_LEN];
        codec::put(&mut b, field::MAGIC, magic);
        codec::put(&mut b, field::OP, self.op);
        codec::put(&mut b, field::PS, self.ps);
        codec::put(&mut b, field::SEQ, self.seq);
        codec::put(&mut b, field::ID, self.id);
        codec::put(&mut b, field::OTHER_ID, self.other_id);
        codec::put(&mut b, field::STATUS, self.status);
        codec::put(&mut b, field::LOCAL_IP, *self.local.ip());
        codec::put(&mut b, field::LOCAL_PORT, self.local.port());
        codec::put(&mut b, field::REMOTE_IP, *self.remote.ip());
        codec::put(&mut b, field::REMOTE_PORT, self.remote.port());
        codec::put(&mut b, field::QPN, self.qpn);
        codec::put(&mut b, field::BACKLOG, self.backlog);
        let c = self.conn;
        codec::put(
            &mut b,
            field::CONN,
            [
                c.responder_resources,
                c.initiator_depth,
                c.flow_control,
                c.retry_count,
                c.rnr_retry_count,
                c.srq,
            ],
        );
        let len = self.private_data.len().min(MAX_PRIVATE_DATA);
        codec::put(&mut b, field::PRIVATE_LEN, len as u16);
        codec::put(&mut b, field::TOKEN, self.token);
        b[field::PRIVATE.start..field::PRIVATE.start + len]
            .copy_from_slice(&self.private_data[..len]);
        b
    }

    /// Decodes a record that must carry `magic`: exact length, magic, private data length,
    /// and for requests a known [`CmOp`].
    pub fn decode(b: &[u8], magic: [u8; 4]) -> Result<CmRecord, DecodeError> {
        exact("CmRecord", b, CM_RECORD_LEN)?;
        expect_magic("CmRecord", b, field::MAGIC, &magic)?;
        let op: u16 = codec::get(b, field::OP);
        if magic != EVENT {
            CmOp::try_from(op)?;
        } else if op > event::LAST {
            return Err(DecodeError::Unknown {
                what: "CmEvent",
                value: u64::from(op),
            });
        }
        let len = usize::from(codec::get::<u16>(b, field::PRIVATE_LEN));
        if len > MAX_PRIVATE_DATA {
            return Err(DecodeError::Invalid {
                what: "CmRecord",
                why: "private data longer than a record holds",
            });
        }
        let conn: [u8; 6] = codec::get(b, field::CONN);
        Ok(CmRecord {
            op,
            ps: codec::get(b, field::PS),
            seq: codec::get(b, field::SEQ),
            id: codec::get(b, field::ID),
            other_id: codec::get(b, field::OTHER_ID),
            status: codec::get(b, field::STATUS),
            local: SocketAddrV4::new(
                codec::get(b, field::LOCAL_IP),
                codec::get(b, field::LOCAL_PORT),
            ),
            remote: SocketAddrV4::new(
                codec::get(b, field::REMOTE_IP),
                codec::get(b, field::REMOTE_PORT),
            ),
            qpn: codec::get(b, field::QPN),
            backlog: codec::get(b, field::BACKLOG),
            conn: ConnParams {
                responder_resources: conn[0],
                initiator_depth: conn[1],
                flow_control: conn[2],
                retry_count: conn[3],
                rnr_retry_count: conn[4],
                srq: conn[5],
            },
            token: codec::get(b, field::TOKEN),
            private_data: b[field::PRIVATE.start..field::PRIVATE.start + len].to_vec(),
        })
    }

    /// The request's op (decoding checked it).
    pub fn cm_op(&self) -> Option<CmOp> {
        CmOp::try_from(self.op).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_bad_ones_are_refused() {
        let rec = CmRecord {
            op: CmOp::Connect as u16,
            ps: port_space::TCP,
            seq: 7,
            id: 3,
            other_id: 9,
            status: -113,
            local: "10.32.0.2:7174".parse().unwrap(),
            remote: "10.32.0.3:80".parse().unwrap(),
            qpn: 0x1234,
            backlog: 5,
            conn: ConnParams {
                responder_resources: 1,
                initiator_depth: 2,
                flow_control: 3,
                retry_count: 4,
                rnr_retry_count: 5,
                srq: 0,
            },
            token: u64::MAX - 1,
            private_data: b"hello".to_vec(),
        };
        let b = rec.encode(REQUEST);
        assert_eq!(CmRecord::decode(&b, REQUEST).unwrap(), rec);
        assert!(CmRecord::decode(&b, REPLY).is_err(), "wrong magic");
        assert!(CmRecord::decode(&b[..100], REQUEST).is_err(), "short");
        let mut bad = b;
        bad[4] = 0xee;
        assert!(CmRecord::decode(&bad, REQUEST).is_err(), "unknown op");
        let mut bad = b;
        bad[54] = 0xff;
        bad[55] = 0x01;
        assert!(
            CmRecord::decode(&bad, REQUEST).is_err(),
            "private data too long"
        );
        let ev = CmRecord::event(event::ESTABLISHED, 4, 0);
        assert_eq!(CmRecord::decode(&ev.encode(EVENT), EVENT).unwrap(), ev);
    }
}
