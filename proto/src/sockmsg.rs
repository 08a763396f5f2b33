//! TCP-mode setup messages between `libfsocket.so` and its router, carried on the attach
//! connection (SOCK_SEQPACKET) so that host-network sockets can travel with the replies
//! (SCM_RIGHTS). Fixed 32-byte little-endian records; anything else is malformed.
//!
//! Only connection setup goes through the router: once the application's fd is a host socket,
//! its bytes never touch Freeflow.

use crate::codec::{self, exact, expect_magic, wire_enum, DecodeError};
use std::net::Ipv4Addr;
use std::ops::Range;

/// Bytes of every request and reply.
pub const SOCKMSG_LEN: usize = 32;
const REQUEST_MAGIC: [u8; 4] = *b"FFSQ";
const REPLY_MAGIC: [u8; 4] = *b"FFSR";
const NOTICE_MAGIC: [u8; 4] = *b"FFSN";
/// Where every request, reply and notice has its magic.
const MAGIC: Range<usize> = 0..4;

wire_enum! {
    /// What the shim asks for.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum SockOp: u16, from u16 {
        /// Connect to an overlay address; reply carries a connecting host socket, or says fall
        /// back.
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
        /// `port`. The request carries that host listener and a new overlay listener (in this
        /// order), so that the new router takes up where the old one stopped.
        Relisten = 6,
        /// This process takes the clients without Freeflow of its listener on `port` itself:
        /// its accept waits on the overlay listener beside the host listener, so the router
        /// rings a doorbell only for a client that waits longer than a short grace.
        Accepts = 7,
    }
}

bitflags::bitflags! {
    /// The flags of a [`SockRequest`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct SockFlags: u16 {
        /// The application's socket is AF_INET6 (the host socket must be too).
        const INET6 = 1;
        /// Listen: the application's socket has SO_REUSEPORT; other processes of the same
        /// container listening on the port with SO_REUSEPORT share the listener.
        const REUSEPORT = 2;
        /// Unlisten: the process forked while holding the listener, so a child may hold it
        /// without having claimed it yet: keep it for the orphan grace instead of removing it.
        const ORPHAN = 4;
    }
}

/// [`SockFlags::INET6`].
pub const FLAG_INET6: u16 = SockFlags::INET6.bits();
/// [`SockFlags::REUSEPORT`].
pub const FLAG_REUSEPORT: u16 = SockFlags::REUSEPORT.bits();
/// [`SockFlags::ORPHAN`].
pub const FLAG_ORPHAN: u16 = SockFlags::ORPHAN.bits();

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

/// Offsets of a [`SockRequest`] after its magic (the rest is zero).
mod request_field {
    use std::ops::Range;
    pub const OP: Range<usize> = 4..6;
    pub const FLAGS: Range<usize> = 6..8;
    pub const SEQ: Range<usize> = 8..12;
    pub const IP: Range<usize> = 12..16;
    pub const PORT: Range<usize> = 16..18;
    pub const BACKLOG: Range<usize> = 20..24;
}

impl SockRequest {
    pub fn encode(&self) -> [u8; SOCKMSG_LEN] {
        use request_field as field;
        let mut b = [0u8; SOCKMSG_LEN];
        codec::put(&mut b, MAGIC, REQUEST_MAGIC);
        codec::put(&mut b, field::OP, self.op as u16);
        codec::put(&mut b, field::FLAGS, self.flags);
        codec::put(&mut b, field::SEQ, self.seq);
        codec::put(&mut b, field::IP, self.ip);
        codec::put(&mut b, field::PORT, self.port);
        codec::put(&mut b, field::BACKLOG, self.backlog);
        b
    }

    pub fn decode(b: &[u8]) -> Result<SockRequest, DecodeError> {
        use request_field as field;
        exact("SockRequest", b, SOCKMSG_LEN)?;
        expect_magic("SockRequest", b, MAGIC, &REQUEST_MAGIC)?;
        Ok(SockRequest {
            op: SockOp::try_from(codec::get::<u16>(b, field::OP))?,
            flags: codec::get(b, field::FLAGS),
            seq: codec::get(b, field::SEQ),
            ip: codec::get(b, field::IP),
            port: codec::get(b, field::PORT),
            backlog: codec::get(b, field::BACKLOG),
        })
    }
}

wire_enum! {
    /// How the router answered.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum SockStatus: u16, from u16 {
        /// Done; a host socket comes with the reply for connect and listen.
        Ok = 0,
        /// Not accelerated: use the normal (overlay) path, as without Freeflow.
        Fallback = 1,
        /// Failed with `errno`.
        Error = 2,
    }
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

/// Offsets of a [`SockReply`] after its magic (the rest is zero).
mod reply_field {
    use std::ops::Range;
    pub const STATUS: Range<usize> = 4..6;
    pub const SEQ: Range<usize> = 8..12;
    pub const ERRNO: Range<usize> = 12..16;
    pub const IP: Range<usize> = 16..20;
    pub const PORT: Range<usize> = 20..22;
}

impl SockReply {
    pub fn encode(&self) -> [u8; SOCKMSG_LEN] {
        use reply_field as field;
        let mut b = [0u8; SOCKMSG_LEN];
        codec::put(&mut b, MAGIC, REPLY_MAGIC);
        codec::put(&mut b, field::STATUS, self.status as u16);
        codec::put(&mut b, field::SEQ, self.seq);
        codec::put(&mut b, field::ERRNO, self.errno);
        codec::put(&mut b, field::IP, self.ip);
        codec::put(&mut b, field::PORT, self.port);
        b
    }

    pub fn decode(b: &[u8]) -> Result<SockReply, DecodeError> {
        use reply_field as field;
        exact("SockReply", b, SOCKMSG_LEN)?;
        expect_magic("SockReply", b, MAGIC, &REPLY_MAGIC)?;
        Ok(SockReply {
            status: SockStatus::try_from(codec::get::<u16>(b, field::STATUS))?,
            seq: codec::get(b, field::SEQ),
            errno: codec::get(b, field::ERRNO),
            ip: codec::get(b, field::IP),
            port: codec::get(b, field::PORT),
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
        use notice_field as field;
        let mut b = [0u8; SOCKMSG_LEN];
        codec::put(&mut b, MAGIC, NOTICE_MAGIC);
        codec::put(&mut b, field::HOST_IP, self.host_ip);
        codec::put(&mut b, field::HOST_PORT, self.host_port);
        codec::put(&mut b, field::IP, self.ip);
        codec::put(&mut b, field::PORT, self.port);
        codec::put(&mut b, field::SENT_MS, self.sent_ms);
        b
    }

    pub fn decode(b: &[u8]) -> Result<SockNotice, DecodeError> {
        use notice_field as field;
        exact("SockNotice", b, SOCKMSG_LEN)?;
        expect_magic("SockNotice", b, MAGIC, &NOTICE_MAGIC)?;
        Ok(SockNotice {
            host_ip: codec::get(b, field::HOST_IP),
            host_port: codec::get(b, field::HOST_PORT),
            ip: codec::get(b, field::IP),
            port: codec::get(b, field::PORT),
            sent_ms: codec::get(b, field::SENT_MS),
        })
    }
}

/// Offsets of a [`SockNotice`] after its magic (the rest is zero).
mod notice_field {
    use std::ops::Range;
    pub const HOST_IP: Range<usize> = 4..8;
    pub const HOST_PORT: Range<usize> = 8..10;
    pub const IP: Range<usize> = 12..16;
    pub const PORT: Range<usize> = 16..18;
    pub const SENT_MS: Range<usize> = 20..24;
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
    pub fn decode(b: &[u8]) -> Result<FromRouter, DecodeError> {
        if b.get(MAGIC) == Some(&NOTICE_MAGIC[..]) {
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
