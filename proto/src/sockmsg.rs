//! TCP-mode setup messages between `libfsocket.so` and its router, carried on the attach
//! connection (SOCK_SEQPACKET) so that host-network sockets can travel with the replies
//! (SCM_RIGHTS). Fixed 32-byte little-endian records; anything else is malformed.
//!
//! Only connection setup goes through the router: once the application's fd is a host socket,
//! its bytes never touch Freeflow.

use std::net::Ipv4Addr;

/// Bytes of every request and reply.
pub const SOCKMSG_LEN: usize = 32;
const REQUEST_MAGIC: [u8; 4] = *b"FFSQ";
const REPLY_MAGIC: [u8; 4] = *b"FFSR";

/// What the shim asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SockOp {
    /// Connect to an overlay address; reply carries a connecting host socket, or says fall back.
    Connect = 1,
    /// Listen on an overlay address; reply carries a listening host socket.
    Listen = 2,
    /// The application closed its listener.
    Unlisten = 3,
    /// Which overlay address is behind this host address and port (an accepted peer)?
    Resolve = 4,
    /// This (forked) process holds the listener on `port` too: keep it while any holder lives.
    Own = 5,
}

impl SockOp {
    fn from_u16(v: u16) -> Option<SockOp> {
        Some(match v {
            1 => SockOp::Connect,
            2 => SockOp::Listen,
            3 => SockOp::Unlisten,
            4 => SockOp::Resolve,
            5 => SockOp::Own,
            _ => return None,
        })
    }
}

/// Flag: the application's socket is AF_INET6 (the host socket must be too).
pub const FLAG_INET6: u16 = 1;

/// A request from the shim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockRequest {
    pub op: SockOp,
    pub flags: u16,
    /// Chosen by the shim, echoed in the reply.
    pub seq: u32,
    /// Overlay address (connect, listen, unlisten) or host address (resolve).
    pub ip: Ipv4Addr,
    pub port: u16,
    /// Listen backlog.
    pub backlog: u32,
}

impl SockRequest {
    pub fn encode(&self) -> [u8; SOCKMSG_LEN] {
        let mut b = [0u8; SOCKMSG_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC);
        b[4..6].copy_from_slice(&(self.op as u16).to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.seq.to_le_bytes());
        b[12..16].copy_from_slice(&self.ip.octets());
        b[16..18].copy_from_slice(&self.port.to_le_bytes());
        b[20..24].copy_from_slice(&self.backlog.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<SockRequest, String> {
        if b.len() != SOCKMSG_LEN || b[0..4] != REQUEST_MAGIC {
            return Err(format!("not a socket request ({} bytes)", b.len()));
        }
        let op = u16::from_le_bytes([b[4], b[5]]);
        Ok(SockRequest {
            op: SockOp::from_u16(op).ok_or_else(|| format!("unknown socket op {op}"))?,
            flags: u16::from_le_bytes([b[6], b[7]]),
            seq: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            ip: Ipv4Addr::new(b[12], b[13], b[14], b[15]),
            port: u16::from_le_bytes([b[16], b[17]]),
            backlog: u32::from_le_bytes(b[20..24].try_into().expect("4 bytes")),
        })
    }
}

/// How the router answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SockStatus {
    /// Done; a host socket comes with the reply for connect and listen.
    Ok = 0,
    /// Not accelerated: use the normal (overlay) path, as without Freeflow.
    Fallback = 1,
    /// Failed with `errno`.
    Error = 2,
}

/// A reply from the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockReply {
    pub status: SockStatus,
    pub seq: u32,
    pub errno: i32,
    /// Connect: the overlay source address the application gets. Listen: the overlay address.
    /// Resolve: the overlay address of the peer.
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl SockReply {
    pub fn encode(&self) -> [u8; SOCKMSG_LEN] {
        let mut b = [0u8; SOCKMSG_LEN];
        b[0..4].copy_from_slice(&REPLY_MAGIC);
        b[4..6].copy_from_slice(&(self.status as u16).to_le_bytes());
        b[8..12].copy_from_slice(&self.seq.to_le_bytes());
        b[12..16].copy_from_slice(&self.errno.to_le_bytes());
        b[16..20].copy_from_slice(&self.ip.octets());
        b[20..22].copy_from_slice(&self.port.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<SockReply, String> {
        if b.len() != SOCKMSG_LEN || b[0..4] != REPLY_MAGIC {
            return Err(format!("not a socket reply ({} bytes)", b.len()));
        }
        let status = match u16::from_le_bytes([b[4], b[5]]) {
            0 => SockStatus::Ok,
            1 => SockStatus::Fallback,
            2 => SockStatus::Error,
            other => return Err(format!("unknown reply status {other}")),
        };
        Ok(SockReply {
            status,
            seq: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            errno: i32::from_le_bytes(b[12..16].try_into().expect("4 bytes")),
            ip: Ipv4Addr::new(b[16], b[17], b[18], b[19]),
            port: u16::from_le_bytes([b[20], b[21]]),
        })
    }

    pub fn fallback(seq: u32) -> SockReply {
        SockReply {
            status: SockStatus::Fallback,
            seq,
            errno: 0,
            ip: Ipv4Addr::UNSPECIFIED,
            port: 0,
        }
    }

    pub fn error(seq: u32, errno: i32) -> SockReply {
        SockReply {
            status: SockStatus::Error,
            seq,
            errno,
            ip: Ipv4Addr::UNSPECIFIED,
            port: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip_and_reject_garbage() {
        let r = SockRequest {
            op: SockOp::Listen,
            flags: FLAG_INET6,
            seq: 9,
            ip: Ipv4Addr::new(10, 32, 0, 5),
            port: 80,
            backlog: 128,
        };
        assert_eq!(SockRequest::decode(&r.encode()).unwrap(), r);
        let mut bad = r.encode();
        bad[4] = 99;
        assert!(SockRequest::decode(&bad).is_err());
        assert!(SockRequest::decode(&r.encode()[..31]).is_err());
        let reply = SockReply {
            status: SockStatus::Ok,
            seq: 9,
            errno: 0,
            ip: Ipv4Addr::new(10, 32, 0, 5),
            port: 40000,
        };
        assert_eq!(SockReply::decode(&reply.encode()).unwrap(), reply);
        assert!(SockReply::decode(&[0u8; 32]).is_err());
        assert_eq!(
            SockReply::decode(&SockReply::error(3, 111).encode())
                .unwrap()
                .errno,
            111
        );
    }
}
