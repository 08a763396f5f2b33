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
const NOTICE_MAGIC: [u8; 4] = *b"FFSN";

/// What the shim asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SockOp {
    /// Connect to an overlay address; reply carries a connecting host socket, or says fall back.
    Connect = 1,
    /// Listen on an overlay address; reply carries a listening host socket. The request may
    /// carry the application's own socket, already listening on the overlay address in the
    /// container: the router accepts clients that arrive there without Freeflow and hands each
    /// to the application through the host listener (see `Resolve`).
    Listen = 2,
    /// The application closed its listener.
    Unlisten = 3,
    /// Which overlay address is behind this host address and port (an accepted peer)? If the
    /// accepted connection stands for a client that reached the overlay listener without
    /// Freeflow, the reply carries that client's real (overlay) connection to use instead.
    Resolve = 4,
    /// This (forked) process holds the listener on `port` too: keep it while any holder lives.
    Own = 5,
    /// After a router restart: this process still holds an accelerated listener on overlay
    /// `port`. The request carries that host listener and a new overlay listener (in this order),
    /// so that the new router takes up where the old one stopped.
    Relisten = 6,
}

impl SockOp {
    fn from_u16(v: u16) -> Option<SockOp> {
        Some(match v {
            1 => SockOp::Connect,
            2 => SockOp::Listen,
            3 => SockOp::Unlisten,
            4 => SockOp::Resolve,
            5 => SockOp::Own,
            6 => SockOp::Relisten,
            _ => return None,
        })
    }
}

/// Flag: the application's socket is AF_INET6 (the host socket must be too).
pub const FLAG_INET6: u16 = 1;
/// Flag (listen): the application's socket has SO_REUSEPORT; other processes of the same
/// container listening on the port with SO_REUSEPORT share the listener.
pub const FLAG_REUSEPORT: u16 = 2;
/// Flag (unlisten): the process forked while holding the listener, so a child may hold it
/// without having claimed it yet: keep it for the orphan grace instead of removing it.
pub const FLAG_ORPHAN: u16 = 4;

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

/// Sent by the router without a request, to the processes holding an accelerated listener: "the
/// connection that will arrive from host address `host_ip:host_port` is the overlay address
/// `ip:port`". With it, accept needs no round trip to the router (a Resolve is the fallback when
/// the notice has not arrived yet, or was dropped because the process was not reading).
///
/// Two notices take knowledge back, read in order with the others:
/// - [`SockNotice::forget`]: what was said about `host_ip:host_port` no longer holds (the port is
///   now used otherwise, e.g. by a relayed client that only a Resolve can hand over);
/// - [`SockNotice::forget_all`]: the router is about to skip notices to this process (it is not
///   reading them): everything said before may have been overtaken by a notice it did not get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockNotice {
    pub host_ip: Ipv4Addr,
    pub host_port: u16,
    pub ip: Ipv4Addr,
    pub port: u16,
    /// When the router sent it ([`crate::clock::monotonic_ms`], set at sending): the shim
    /// trusts a notice for a while after it was sent, however long it waited unread.
    pub sent_ms: u32,
}

impl SockNotice {
    /// Takes back what was said about host address `host`.
    pub fn forget(host: (Ipv4Addr, u16)) -> SockNotice {
        SockNotice {
            host_ip: host.0,
            host_port: host.1,
            ip: Ipv4Addr::UNSPECIFIED,
            port: 0,
            sent_ms: 0,
        }
    }

    /// Takes back everything said before.
    pub fn forget_all() -> SockNotice {
        SockNotice::forget((Ipv4Addr::UNSPECIFIED, 0))
    }

    /// What this notice tells.
    pub fn meaning(&self) -> NoticeMeaning {
        let host = (self.host_ip, self.host_port);
        match (self.ip.is_unspecified(), host == (Ipv4Addr::UNSPECIFIED, 0)) {
            (false, _) => NoticeMeaning::Is {
                host,
                overlay: (self.ip, self.port),
            },
            (true, false) => NoticeMeaning::Forget(host),
            (true, true) => NoticeMeaning::ForgetAll,
        }
    }

    pub fn encode(&self) -> [u8; SOCKMSG_LEN] {
        let mut b = [0u8; SOCKMSG_LEN];
        b[0..4].copy_from_slice(&NOTICE_MAGIC);
        b[4..8].copy_from_slice(&self.host_ip.octets());
        b[8..10].copy_from_slice(&self.host_port.to_le_bytes());
        b[12..16].copy_from_slice(&self.ip.octets());
        b[16..18].copy_from_slice(&self.port.to_le_bytes());
        b[20..24].copy_from_slice(&self.sent_ms.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<SockNotice, String> {
        if b.len() != SOCKMSG_LEN || b[0..4] != NOTICE_MAGIC {
            return Err(format!("not a socket notice ({} bytes)", b.len()));
        }
        Ok(SockNotice {
            host_ip: Ipv4Addr::new(b[4], b[5], b[6], b[7]),
            host_port: u16::from_le_bytes([b[8], b[9]]),
            ip: Ipv4Addr::new(b[12], b[13], b[14], b[15]),
            port: u16::from_le_bytes([b[16], b[17]]),
            sent_ms: u32::from_le_bytes([b[20], b[21], b[22], b[23]]),
        })
    }
}

/// A [`SockNotice`], read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeMeaning {
    /// The connection from host address `host` is the overlay address `overlay`.
    Is {
        host: (Ipv4Addr, u16),
        overlay: (Ipv4Addr, u16),
    },
    Forget((Ipv4Addr, u16)),
    ForgetAll,
}

/// What the router may send on a socket shim's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FromRouter {
    Reply(SockReply),
    Notice(SockNotice),
}

impl FromRouter {
    pub fn decode(b: &[u8]) -> Result<FromRouter, String> {
        if b.len() >= 4 && b[0..4] == NOTICE_MAGIC {
            SockNotice::decode(b).map(FromRouter::Notice)
        } else {
            SockReply::decode(b).map(FromRouter::Reply)
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
        let notice = SockNotice {
            host_ip: Ipv4Addr::new(192, 168, 1, 2),
            host_port: 41000,
            ip: Ipv4Addr::new(10, 32, 0, 4),
            port: 41000,
            sent_ms: 123_456,
        };
        assert_eq!(
            FromRouter::decode(&notice.encode()).unwrap(),
            FromRouter::Notice(notice)
        );
        assert_eq!(
            FromRouter::decode(&reply.encode()).unwrap(),
            FromRouter::Reply(reply)
        );
        assert!(FromRouter::decode(&notice.encode()[..20]).is_err());
        assert!(FromRouter::decode(&r.encode()).is_err());
    }

    #[test]
    fn notices_say_what_they_mean() {
        let host = (Ipv4Addr::new(192, 168, 1, 2), 41000);
        let is = SockNotice {
            host_ip: host.0,
            host_port: host.1,
            ip: Ipv4Addr::new(10, 32, 0, 4),
            port: 41000,
            sent_ms: 0,
        };
        assert_eq!(
            is.meaning(),
            NoticeMeaning::Is {
                host,
                overlay: (Ipv4Addr::new(10, 32, 0, 4), 41000)
            }
        );
        let forget = SockNotice::forget(host);
        assert_eq!(forget.meaning(), NoticeMeaning::Forget(host));
        assert_eq!(SockNotice::forget_all().meaning(), NoticeMeaning::ForgetAll);
        for n in [forget, SockNotice::forget_all()] {
            assert_eq!(
                FromRouter::decode(&n.encode()).unwrap(),
                FromRouter::Notice(n)
            );
        }
    }
}
