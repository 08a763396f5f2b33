//! The attach handshake on `$FREEFLOW_DIR/router.sock` (SOCK_SEQPACKET, so every message arrives
//! whole or not at all), and the shim side of an attachment.
//!
//! 1. The shim connects and sends a [`Hello`]: magic, protocol version, what it is.
//! 2. The router identifies the caller by SO_PEERCRED and the network namespace of that pid,
//!    never by anything the hello says, and answers with a [`Welcome`]: accepted, with the
//!    region memfd and the shard's doorbell eventfd attached; or refused, with a reason.
//! 3. The connection stays open for the life of the attachment: when the shim's process exits,
//!    the router sees the hang-up and frees everything the attachment held.

use crate::codec::{self, expect_magic, wire_enum, DecodeError};
use crate::doorbell::{futex_wait, futex_wake, EventFd};
use crate::fdpass;
use crate::msg::{MsgHeader, HEADER_LEN, REPLY};
use crate::region::{RegionError, SharedRegion};
use crate::{Consumer, Producer, RingError, Wake};
use freeflow_os::poll::{poll, PollFd};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// Version of the attach protocol and of the messages on the rings.
pub const PROTOCOL_VERSION: u16 = 1;
const HELLO_MAGIC: [u8; 4] = *b"FFHI";
const WELCOME_MAGIC: [u8; 4] = *b"FFWL";
/// Bytes of a hello.
pub const HELLO_LEN: usize = 16;
/// Bytes of a welcome before its text.
pub const WELCOME_HEADER_LEN: usize = 24;
/// Longest text in a welcome (a reason, or name and tenant).
pub const MAX_WELCOME_TEXT: usize = 1024;
/// Ring 0 of a region carries requests (shim to router), ring 1 replies (router to shim).
pub const REQUEST_RING: usize = 0;
pub const REPLY_RING: usize = 1;

wire_enum! {
    /// What is attaching.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ShimKind: u16, from u16; fn from_u16(u16) {
        Socket = 1,
        Verbs = 2,
        /// Benchmarks and tests.
        Probe = 3,
        /// Freeflow's librdmacm: a process's requests to the connection manager (crate::cm).
        CmRequests = 4,
        /// Freeflow's librdmacm: one event channel (crate::cm).
        CmChannel = 5,
    }
}

impl ShimKind {
    pub fn name(self) -> &'static str {
        match self {
            ShimKind::Socket => "socket",
            ShimKind::Verbs => "verbs",
            ShimKind::Probe => "probe",
            ShimKind::CmRequests => "rdmacm",
            ShimKind::CmChannel => "rdmacm-channel",
        }
    }
}

/// Offsets of a [`Hello`] (the rest is zero).
mod hello_field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const VERSION: Range<usize> = 4..6;
    pub const KIND: Range<usize> = 6..8;
}

/// First message of a shim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub kind: u16,
}

/// Why a hello could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("hello of {0} bytes, expected {HELLO_LEN}")]
    Length(usize),
    #[error("hello has a bad magic")]
    Magic,
    #[error("protocol version {theirs}, this router speaks {PROTOCOL_VERSION}")]
    Version { theirs: u16 },
    #[error("unknown shim kind {0}")]
    Kind(u16),
}

impl Hello {
    pub fn new(kind: ShimKind) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            kind: kind as u16,
        }
    }

    pub fn encode(&self) -> [u8; HELLO_LEN] {
        use hello_field as field;
        let mut b = [0u8; HELLO_LEN];
        codec::put(&mut b, field::MAGIC, HELLO_MAGIC);
        codec::put(&mut b, field::VERSION, self.version);
        codec::put(&mut b, field::KIND, self.kind);
        b
    }

    /// Decodes and checks a hello: exact length, magic, version, known kind.
    pub fn decode(b: &[u8]) -> Result<(Hello, ShimKind), HelloError> {
        use hello_field as field;
        if b.len() != HELLO_LEN {
            return Err(HelloError::Length(b.len()));
        }
        if b[field::MAGIC] != HELLO_MAGIC {
            return Err(HelloError::Magic);
        }
        let hello = Hello {
            version: codec::get(b, field::VERSION),
            kind: codec::get(b, field::KIND),
        };
        if hello.version != PROTOCOL_VERSION {
            return Err(HelloError::Version {
                theirs: hello.version,
            });
        }
        let kind = ShimKind::from_u16(hello.kind).ok_or(HelloError::Kind(hello.kind))?;
        Ok((hello, kind))
    }
}

wire_enum! {
    /// Why the router refused an attach.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Refusal: u16, from u16; fn from_u16(u16) {
        VersionMismatch = 1,
        NotRegistered = 2,
        Malformed = 3,
        Busy = 4,
        Internal = 5,
        ShuttingDown = 6,
    }
}

/// The router's answer to a hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Welcome {
    Accepted {
        shard: u16,
        attachment_id: u32,
        ip: Ipv4Addr,
        container: String,
        tenant: String,
    },
    Refused {
        reason: Refusal,
        message: String,
    },
}

/// Offsets of a [`Welcome`]'s header; its text follows.
mod welcome_field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const VERSION: Range<usize> = 4..6;
    /// 0 when accepted, else the [`super::Refusal`].
    pub const STATUS: Range<usize> = 6..8;
    pub const SHARD: Range<usize> = 8..10;
    pub const TEXT_LEN: Range<usize> = 10..12;
    pub const ATTACHMENT_ID: Range<usize> = 12..16;
    pub const IP: Range<usize> = 16..20;
}

impl Welcome {
    pub fn encode(&self) -> Vec<u8> {
        use welcome_field as field;
        let mut b = vec![0u8; WELCOME_HEADER_LEN];
        codec::put(&mut b, field::MAGIC, WELCOME_MAGIC);
        codec::put(&mut b, field::VERSION, PROTOCOL_VERSION);
        let text = match self {
            Welcome::Accepted {
                shard,
                attachment_id,
                ip,
                container,
                tenant,
            } => {
                codec::put(&mut b, field::SHARD, *shard);
                codec::put(&mut b, field::ATTACHMENT_ID, *attachment_id);
                codec::put(&mut b, field::IP, *ip);
                format!("{container}\n{tenant}")
            }
            Welcome::Refused { reason, message } => {
                codec::put(&mut b, field::STATUS, *reason as u16);
                message.clone()
            }
        };
        let mut text = text.into_bytes();
        text.truncate(MAX_WELCOME_TEXT);
        codec::put(&mut b, field::TEXT_LEN, text.len() as u16);
        b.extend_from_slice(&text);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Welcome, DecodeError> {
        use welcome_field as field;
        let invalid = |why| DecodeError::Invalid {
            what: "Welcome",
            why,
        };
        if b.len() < WELCOME_HEADER_LEN {
            return Err(invalid("shorter than its header"));
        }
        expect_magic("Welcome", b, field::MAGIC, &WELCOME_MAGIC)?;
        let version: u16 = codec::get(b, field::VERSION);
        let status: u16 = codec::get(b, field::STATUS);
        let text_len = usize::from(codec::get::<u16>(b, field::TEXT_LEN));
        if text_len > MAX_WELCOME_TEXT || b.len() != WELCOME_HEADER_LEN + text_len {
            return Err(invalid("text length mismatch"));
        }
        let text = String::from_utf8_lossy(&b[WELCOME_HEADER_LEN..]).into_owned();
        if status != 0 {
            return Ok(Welcome::Refused {
                reason: Refusal::try_from(status)?,
                message: text,
            });
        }
        if version != PROTOCOL_VERSION {
            return Err(DecodeError::Version {
                what: "Welcome",
                theirs: version,
                ours: PROTOCOL_VERSION,
            });
        }
        let (container, tenant) = text
            .split_once('\n')
            .ok_or(invalid("welcome without tenant"))?;
        Ok(Welcome::Accepted {
            shard: codec::get(b, field::SHARD),
            attachment_id: codec::get(b, field::ATTACHMENT_ID),
            ip: codec::get(b, field::IP),
            container: container.to_string(),
            tenant: tenant.to_string(),
        })
    }
}

/// Why attaching failed, as a shim reports it.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("router not reachable at {path}: {source}")]
    Unreachable {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("router refused the attach ({reason:?}): {message}")]
    Refused { reason: Refusal, message: String },
    #[error("attach protocol error: {0}")]
    Protocol(String),
    #[error("attach I/O error: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Region(#[from] RegionError),
}

/// Why a call on an attachment failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("router gone (attachment closed)")]
    RouterGone,
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("request ring full")]
    Full,
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("doorbell: {0}")]
    Doorbell(io::Error),
}

/// Facts the router told us about our attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachInfo {
    pub shard: u16,
    pub attachment_id: u32,
    pub ip: Ipv4Addr,
    pub container: String,
    pub tenant: String,
}

/// The shim side of an attachment: the connection, the rings and the router's doorbell.
#[derive(Debug)]
pub struct Session {
    conn: OwnedFd,
    region: SharedRegion,
    requests: Producer,
    replies: Consumer,
    router_bell: EventFd,
    info: AttachInfo,
    scratch: Vec<u8>,
    /// Spin iterations on an empty reply ring before parking.
    pub spin_limit: u32,
}

/// Connects to `dir/router.sock`, says hello as `kind` and returns the connection, the router's
/// answer and any descriptors that came with it.
fn handshake(
    dir: &Path,
    kind: ShimKind,
    timeout: Duration,
) -> Result<(OwnedFd, AttachInfo, Vec<OwnedFd>), AttachError> {
    let path = dir.join(crate::ROUTER_SOCKET);
    let conn = fdpass::unix_socket(libc::SOCK_SEQPACKET)?;
    // Before connecting: a Unix connect waits for room in the listener's queue for at most
    // SO_SNDTIMEO (then EAGAIN). A router that is stopped, or whose queue someone else filled,
    // must cost the shim this timeout, not a connect that blocks until the router accepts.
    fdpass::set_timeouts(conn.as_fd(), timeout)?;
    fdpass::connect_unix(conn.as_fd(), &path).map_err(|source| AttachError::Unreachable {
        path: path.display().to_string(),
        source,
    })?;
    fdpass::send_with_fds(conn.as_fd(), &Hello::new(kind).encode(), &[])?;
    let mut buf = vec![0u8; WELCOME_HEADER_LEN + MAX_WELCOME_TEXT + 1];
    let got = fdpass::recv_with_fds(conn.as_fd(), &mut buf, 0)?;
    if got.len == 0 {
        return Err(AttachError::Protocol("router closed the connection".into()));
    }
    if got.truncated {
        return Err(AttachError::Protocol("welcome truncated".into()));
    }
    match Welcome::decode(&buf[..got.len]).map_err(|e| AttachError::Protocol(e.to_string()))? {
        Welcome::Refused { reason, message } => Err(AttachError::Refused { reason, message }),
        Welcome::Accepted {
            shard,
            attachment_id,
            ip,
            container,
            tenant,
        } => Ok((
            conn,
            AttachInfo {
                shard,
                attachment_id,
                ip,
                container,
                tenant,
            },
            got.fds,
        )),
    }
}

/// Connects to the router in `dir` and attaches as `kind` with a pair of rings, waiting at most
/// `timeout` for the router's answer.
pub fn attach(dir: &Path, kind: ShimKind, timeout: Duration) -> Result<Session, AttachError> {
    let (conn, info, fds) = handshake(dir, kind, timeout)?;
    let mut fds = fds.into_iter();
    let (Some(memfd), Some(bell), None) = (fds.next(), fds.next(), fds.next()) else {
        return Err(AttachError::Protocol(
            "welcome must carry exactly two fds".into(),
        ));
    };
    let region = SharedRegion::attach(memfd.as_fd())?;
    if region.ring_count() < 2 {
        return Err(AttachError::Protocol(
            "region has fewer than two rings".into(),
        ));
    }
    let requests = Producer::new(region.ring(REQUEST_RING)?);
    let replies = Consumer::new(region.ring(REPLY_RING)?);
    let scratch = vec![0u8; replies.slot_size()];
    Ok(Session {
        conn,
        region,
        requests,
        replies,
        router_bell: EventFd::from_owned(bell),
        info,
        scratch,
        spin_limit: 20_000,
    })
}

/// The socket shim's attachment: no rings, because every TCP-mode setup request needs a
/// socket passed back with its reply; requests and replies travel on the attach connection.
#[derive(Debug)]
pub struct SocketSession {
    pub conn: OwnedFd,
    pub info: AttachInfo,
}

/// Attaches as the socket shim.
pub fn attach_socket(dir: &Path, timeout: Duration) -> Result<SocketSession, AttachError> {
    let (conn, info, fds) = handshake(dir, ShimKind::Socket, timeout)?;
    if !fds.is_empty() {
        return Err(AttachError::Protocol(
            "a socket attach carries no fds".into(),
        ));
    }
    Ok(SocketSession { conn, info })
}

/// Attaches as one of the connection manager's kinds ([`ShimKind::CmRequests`],
/// [`ShimKind::CmChannel`]): no rings, records on the connection (crate::cm). The connection
/// keeps no timeouts (an event channel blocks in recv until an event comes, as a real one does).
pub fn attach_cm(
    dir: &Path,
    kind: ShimKind,
    timeout: Duration,
) -> Result<SocketSession, AttachError> {
    let (conn, info, fds) = handshake(dir, kind, timeout)?;
    if !fds.is_empty() {
        return Err(AttachError::Protocol("a cm attach carries no fds".into()));
    }
    fdpass::set_timeouts(conn.as_fd(), Duration::ZERO)?;
    Ok(SocketSession { conn, info })
}

impl Session {
    pub fn info(&self) -> &AttachInfo {
        &self.info
    }

    pub fn region(&self) -> &SharedRegion {
        &self.region
    }

    /// Slot size of the request ring.
    pub fn slot_size(&self) -> usize {
        self.requests.slot_size()
    }

    /// Queues one request (not yet visible to the router). `Ok(false)` if the ring is full.
    pub fn push(&mut self, header: MsgHeader, body: &[u8]) -> Result<bool, CallError> {
        let len = HEADER_LEN + body.len();
        if len > self.scratch.len() {
            return Err(CallError::Ring(RingError::TooLong {
                len,
                slot_size: self.scratch.len(),
            }));
        }
        header.encode(&mut self.scratch[..HEADER_LEN]);
        self.scratch[HEADER_LEN..len].copy_from_slice(body);
        Ok(self.requests.push(&self.scratch[..len])?)
    }

    /// Publishes queued requests and rings the router's doorbell if its shard is parked.
    pub fn flush(&mut self) -> Result<(), CallError> {
        if self.requests.publish() == Wake::Needed {
            self.router_bell.ring().map_err(CallError::Doorbell)?;
        }
        Ok(())
    }

    /// Free request slots.
    pub fn free_slots(&mut self) -> Result<u32, CallError> {
        Ok(self.requests.free_slots()?)
    }

    /// Takes the next reply into `out` if there is one (no waiting).
    pub fn try_reply(&mut self, out: &mut [u8]) -> Result<Option<MsgHeader>, CallError> {
        if !self.replies.pop(out)? {
            return Ok(None);
        }
        self.replies.release();
        Ok(Some(MsgHeader::decode(out)))
    }

    /// Waits for the next reply: spins `spin_limit` times, then parks on the reply ring's futex
    /// in short slices, checking between slices that the router is still there.
    pub fn wait_reply(
        &mut self,
        out: &mut [u8],
        timeout: Duration,
    ) -> Result<MsgHeader, CallError> {
        for _ in 0..self.spin_limit {
            if let Some(h) = self.try_reply(out)? {
                return Ok(h);
            }
            std::hint::spin_loop();
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(h) = self.try_reply(out)? {
                return Ok(h);
            }
            if self.router_hung_up() {
                return Err(CallError::RouterGone);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CallError::Timeout(timeout));
            }
            if self.replies.prepare_park()? {
                let parked = &self.replies.memory().control().parked.0;
                futex_wait(
                    parked,
                    1,
                    Some((deadline - now).min(Duration::from_millis(50))),
                );
                self.replies.unpark();
            }
        }
    }

    /// Sends one request and waits for its reply (whose header is returned; the body is in
    /// `out` after [`HEADER_LEN`]).
    pub fn call(
        &mut self,
        header: MsgHeader,
        body: &[u8],
        out: &mut [u8],
        timeout: Duration,
    ) -> Result<MsgHeader, CallError> {
        if !self.push(header, body)? {
            return Err(CallError::Full);
        }
        self.flush()?;
        let reply = self.wait_reply(out, timeout)?;
        debug_assert!(reply.opcode & REPLY != 0);
        Ok(reply)
    }

    /// True once the router closed the attachment (it exited, restarted or detached us).
    pub fn router_hung_up(&self) -> bool {
        let mut fds = [PollFd::new(
            self.conn.as_fd(),
            libc::POLLIN | libc::POLLRDHUP,
        )];
        let ready = poll(&mut fds, Some(Duration::ZERO)).is_ok_and(|n| n > 0);
        ready && fds[0].revents() & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0
    }

    /// The doorbell of the router's shard (for queues of this attachment that the shim
    /// produces into, such as a verbs QP's send and receive rings).
    pub fn router_bell(&self) -> &EventFd {
        &self.router_bell
    }

    /// The attach connection (for tests that misbehave on purpose).
    pub fn connection(&self) -> &OwnedFd {
        &self.conn
    }
}

/// Wakes a consumer parked on `ring`'s futex (the router uses this for reply rings).
pub fn wake_futex_consumer(ring: &Producer) {
    futex_wake(&ring.memory().control().parked.0, 1);
}
