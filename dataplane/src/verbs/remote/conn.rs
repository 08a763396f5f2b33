//! One verbs connection: to another host's router (a non-blocking TCP stream) or to another
//! shard of this router (one end of a Unix socket pair, see `remote::Link`), with a receive
//! buffer that frames are parsed out of and a send buffer that frames are appended to, and the
//! readiness the shard's io_uring reported for it.
//!
//! Both buffers are bounded: the receive side never holds more than one largest frame beyond
//! what was parsed ([`RX_LIMIT`]), and the send side stops taking new requests past
//! [`TX_HIGH`] (the engine checks [`Conn::tx_full`] first).

use super::Link;
use crate::verbs::memory::ViewError;
use crate::verbs::MAX_PIECES;
use crate::verbs::{recv_into, SendPiece, SharedSpan};
use freeflow_proto::verbs::remote::{
    split_frame, FrameError, FrameHeader, FrameKind, Hello, HelloAnswer, ANSWER_LEN, HEADER_LEN,
    HELLO_LEN, MAX_PAYLOAD,
};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpStream};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// The socket under a connection.
#[derive(Debug)]
pub(crate) enum Stream {
    /// To another host's router.
    Tcp(TcpStream),
    /// To another shard of this router (a socket pair made at start).
    Local(UnixStream),
}

impl Stream {
    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Local(s) => s.shutdown(Shutdown::Both),
        };
    }

    pub(crate) fn take_error(&self) -> io::Result<Option<io::Error>> {
        match self {
            Stream::Tcp(s) => s.take_error(),
            Stream::Local(s) => s.take_error(),
        }
    }

    /// Whether a connect finished (a socket pair is connected from the start).
    pub(crate) fn connected(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.peer_addr().is_ok(),
            Stream::Local(_) => true,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Local(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Local(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Local(s) => s.as_raw_fd(),
        }
    }
}

impl std::os::fd::AsFd for Stream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Local(s) => s.as_fd(),
        }
    }
}

impl From<Stream> for OwnedFd {
    fn from(s: Stream) -> OwnedFd {
        match s {
            Stream::Tcp(s) => s.into(),
            Stream::Local(s) => s.into(),
        }
    }
}

/// Unparsed bytes a connection buffers at most: one largest frame, and a little more so that
/// the header of the next one comes with it.
const RX_LIMIT: usize = HEADER_LEN + MAX_PAYLOAD as usize + 64 * 1024;
/// Bytes waiting to be sent beyond which no new request is queued (and a responder stops
/// reading requests): the kernel's socket buffer is the rest of the pipe.
pub(crate) const TX_HIGH: usize = 4 << 20;
/// Bytes read per system call.
const READ_CHUNK: usize = 256 * 1024;

/// A payload sent straight from a container's registered memory: it goes into the stream at
/// byte `at` of the send buffer (after the frame header there), before the buffer's bytes from
/// `at` on.
#[derive(Debug)]
struct Pinned {
    at: usize,
    span: SharedSpan,
    /// Its bytes the kernel took already.
    sent: usize,
}

/// A large WRITE whose payload is received straight into its target (checked at its header):
/// `got` of its `len` bytes came. `span` is None once the landing was revoked (the target's
/// region, QP or container went while the payload came): the rest is read and dropped.
#[derive(Debug)]
struct Landing {
    header: FrameHeader,
    span: Option<SharedSpan>,
    len: usize,
    got: usize,
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// Ours, connecting (non-blocking); given up at the deadline.
    Connecting(Instant),
    /// Ours, connected, the hello sent or queued; the peer's answer has not come yet (no
    /// request goes before it). Given up at the deadline.
    AwaitAnswer(Instant),
    /// Accepted; the peer's hello has not come yet.
    AwaitHello,
    Up,
}

/// What a connection's next bytes are.
pub(crate) enum Next {
    /// Nothing complete yet.
    Nothing,
    /// A frame: its header and where its payload lies in [`Conn::rx`].
    Frame(FrameHeader, Range<usize>),
}

#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) stream: Stream,
    /// The other end: another host's router (its address as the kernel reports it) or
    /// another shard of this router.
    pub(crate) link: Link,
    /// The container the hello named (the connection carries the requests to every container
    /// of the shard serving it; unspecified between shards).
    pub(crate) dst: Ipv4Addr,
    /// Names the connection in the shard's io_uring (in and out polls: `token`, `token | 1`).
    pub(crate) token: u64,
    pub(crate) state: ConnState,
    /// Received bytes in `..rx_end`; what lies beyond is room already zeroed for the next
    /// reads, so that a read costs no clearing of [`READ_CHUNK`] bytes first (a 64-byte frame
    /// used to cost a 256 KiB memset).
    pub(crate) rx: Vec<u8>,
    rx_at: usize,
    rx_end: usize,
    tx: Vec<u8>,
    tx_at: usize,
    /// Payloads that go from registered memory (zero copy), in stream order.
    pinned: VecDeque<Pinned>,
    /// Their bytes not sent yet.
    pinned_pending: usize,
    /// The frame whose payload is being received into its target, if any.
    landing: Option<Landing>,
    /// Where the last frame of `tx` starts if it is a not yet sent ACK, and its QP: a later ACK
    /// of the same QP replaces its sequence number (coalescing).
    last_ack: Option<(usize, u32)>,
    pub(crate) in_armed: bool,
    pub(crate) out_armed: bool,
    /// The poll said readable (or hung up) and the socket was not read dry since.
    pub(crate) readable: bool,
    pub(crate) writable: bool,
    /// When bytes last came (or the connection was made).
    pub(crate) last_heard: Instant,
}

impl Conn {
    pub(crate) fn new(stream: Stream, link: Link, token: u64, state: ConnState) -> Conn {
        Conn {
            stream,
            link,
            dst: Ipv4Addr::UNSPECIFIED,
            token,
            state,
            rx: Vec::new(),
            rx_at: 0,
            rx_end: 0,
            tx: Vec::new(),
            tx_at: 0,
            pinned: VecDeque::new(),
            pinned_pending: 0,
            landing: None,
            last_ack: None,
            in_armed: false,
            out_armed: false,
            readable: true,
            writable: false,
            last_heard: Instant::now(),
        }
    }

    /// Bytes queued and not sent yet.
    pub(crate) fn tx_pending(&self) -> usize {
        self.tx.len() - self.tx_at + self.pinned_pending
    }

    pub(crate) fn tx_full(&self) -> bool {
        self.tx_pending() >= TX_HIGH
    }

    /// Queues the hello (the first bytes of a connection of ours to `dst`'s router).
    pub(crate) fn push_hello(&mut self, host: Ipv4Addr, dst: Ipv4Addr) {
        self.dst = dst;
        self.tx.extend_from_slice(&Hello { host, dst }.encode());
    }

    /// Queues the answer to the peer's hello: shard `shard` of `shards` serves the connection.
    pub(crate) fn push_answer(&mut self, shard: u16, shards: u16) {
        self.tx
            .extend_from_slice(&HelloAnswer { shard, shards }.encode());
    }

    /// Queues a frame: `h` (whose `len` the caller set) and its payload, which `fill` writes
    /// into the `h.len` bytes it is given.
    pub(crate) fn push_frame<E>(
        &mut self,
        h: &FrameHeader,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let start = self.tx.len();
        self.tx.extend_from_slice(&h.encode());
        self.tx.resize(start + HEADER_LEN + h.len as usize, 0);
        if let Err(e) = fill(&mut self.tx[start + HEADER_LEN..]) {
            self.tx.truncate(start);
            return Err(e);
        }
        self.last_ack = None;
        Ok(())
    }

    /// Queues a frame whose payload goes straight from registered memory: `h` (whose `len`
    /// is the spans' total) and the spans in order. The spans keep their pages mapped until
    /// the kernel took their bytes.
    pub(crate) fn push_frame_shared(
        &mut self,
        h: &FrameHeader,
        spans: impl Iterator<Item = SharedSpan>,
    ) {
        self.tx.extend_from_slice(&h.encode());
        let at = self.tx.len();
        let mut total = 0;
        for span in spans.filter(|s| s.len() > 0) {
            total += span.len();
            self.pinned_pending += span.len();
            self.pinned.push_back(Pinned { at, span, sent: 0 });
        }
        debug_assert_eq!(total, h.len as usize, "a frame's length and its payload");
        self.last_ack = None;
    }

    /// Queues an ACK of request `h.seq` of QP `h.dst_qpn`, folded into the previous frame if
    /// that is an unsent ACK of the same QP.
    pub(crate) fn push_ack(&mut self, h: &FrameHeader) {
        debug_assert_eq!(h.kind, FrameKind::Ack);
        if let Some((at, qpn)) = self.last_ack {
            if qpn == h.dst_qpn && at >= self.tx_at && at + HEADER_LEN == self.tx.len() {
                self.tx[at + 24..at + 28].copy_from_slice(&h.seq.to_le_bytes());
                return;
            }
        }
        let at = self.tx.len();
        self.tx.extend_from_slice(&h.encode());
        self.last_ack = Some((at, h.dst_qpn));
    }

    /// Writes what the socket takes. Err: the connection is broken.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        while self.tx_pending() > 0 {
            let sent = if self.pinned.is_empty() {
                self.stream.write(&self.tx[self.tx_at..])
            } else {
                self.send_gathered()
            };
            match sent {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.advance(n);
                    self.last_ack = None;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.writable = false;
        if self.tx_at == self.tx.len() && self.pinned.is_empty() {
            self.tx.clear();
            self.tx_at = 0;
        } else if self.tx_at > TX_HIGH {
            self.tx.drain(..self.tx_at);
            for p in &mut self.pinned {
                p.at -= self.tx_at;
            }
            self.last_ack = None;
            self.tx_at = 0;
        }
        Ok(())
    }

    /// One gathered send of what is queued: the send buffer's bytes and the pinned payloads
    /// between them, in stream order (up to `memory::MAX_PIECES` pieces).
    fn send_gathered(&self) -> io::Result<usize> {
        let mut pieces: [SendPiece<'_>; MAX_PIECES] = [SendPiece::Bytes(&[]); MAX_PIECES];
        let mut n = 0;
        let mut at = self.tx_at;
        // Where this send's bytes of the send buffer end: all of them, unless the send stops
        // before a pinned payload, whose place its last piece must not run past.
        let mut end = self.tx.len();
        for p in &self.pinned {
            if n + 2 > MAX_PIECES {
                end = p.at;
                break;
            }
            if at < p.at {
                pieces[n] = SendPiece::Bytes(&self.tx[at..p.at]);
                n += 1;
                at = p.at;
            }
            pieces[n] = SendPiece::Shared(&p.span, p.sent);
            n += 1;
        }
        if n < MAX_PIECES && at < end {
            pieces[n] = SendPiece::Bytes(&self.tx[at..end]);
            n += 1;
        }
        crate::verbs::send_gathered(self.stream.as_fd(), &pieces[..n])
    }

    /// Moves past `n` bytes sent: the send buffer's and the pinned payloads' in stream order;
    /// a payload sent whole lets its mapping go.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let limit = self.pinned.front().map_or(self.tx.len(), |p| p.at);
            if self.tx_at < limit {
                let k = (limit - self.tx_at).min(n);
                self.tx_at += k;
                n -= k;
                continue;
            }
            let Some(p) = self.pinned.front_mut() else {
                debug_assert!(false, "more sent than queued");
                return;
            };
            let k = (p.span.len() - p.sent).min(n);
            p.sent += k;
            n -= k;
            self.pinned_pending -= k;
            if p.sent == p.span.len() {
                self.pinned.pop_front();
            }
        }
    }

    /// Reads what the socket has, up to the buffer's bound. Err: closed or broken.
    pub(crate) fn fill(&mut self) -> io::Result<()> {
        if self.rx_at > 0 && self.rx_at * 2 >= self.rx_end {
            self.rx.copy_within(self.rx_at..self.rx_end, 0);
            self.rx_end -= self.rx_at;
            self.rx_at = 0;
        }
        if let Some(l) = self.landing.as_mut() {
            // The rest of the payload into its target, then at most the next frame's header:
            // its checks come before its payload is read (see `Conn::land`). A revoked
            // landing reads the rest into the receive buffer instead, and drops it there.
            let room = match l.span {
                Some(_) => HEADER_LEN,
                None => READ_CHUNK,
            };
            if self.rx.len() < self.rx_end + room {
                self.rx.resize(self.rx_end + room, 0);
            }
            while self.readable && l.got < l.len {
                let left = l.len - l.got;
                let (got, wanted) = match &l.span {
                    Some(span) => {
                        let after = &mut self.rx[self.rx_end..self.rx_end + HEADER_LEN];
                        let got = recv_into(self.stream.as_fd(), span, l.got, after);
                        (got, left + HEADER_LEN)
                    }
                    None => {
                        let wanted = (left + HEADER_LEN).min(READ_CHUNK);
                        let into = &mut self.rx[self.rx_end..self.rx_end + wanted];
                        (self.stream.read(into), wanted)
                    }
                };
                match got {
                    Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Ok(n) => {
                        let into_payload = n.min(left);
                        l.got += into_payload;
                        if l.span.is_none() {
                            // The payload's bytes are dropped; what came after it stays.
                            let at = self.rx_end;
                            self.rx.copy_within(at + into_payload..at + n, at);
                        }
                        self.rx_end += n - into_payload;
                        self.last_heard = Instant::now();
                        if n < wanted {
                            self.readable = false;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            // Nothing more until the engine took the landed frame.
            return Ok(());
        }
        while self.readable && self.rx_end - self.rx_at < RX_LIMIT {
            let old = self.rx_end;
            let room = READ_CHUNK.min(RX_LIMIT - (old - self.rx_at));
            if self.rx.len() < old + room {
                self.rx.resize(old + room, 0);
            }
            let got = self.stream.read(&mut self.rx[old..old + room]);
            self.rx_end += *got.as_ref().unwrap_or(&0);
            match got {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) if n < room => {
                    self.readable = false;
                    self.last_heard = Instant::now();
                }
                Ok(_) => self.last_heard = Instant::now(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Takes the peer's hello if it is there; Ok(false) if not yet.
    pub(crate) fn take_hello(&mut self) -> Result<bool, FrameError> {
        let Some(b) = self.received().get(..HELLO_LEN) else {
            return Ok(false);
        };
        let hello = Hello::decode(b.try_into().expect("16 bytes"))?;
        if Link::Host(hello.host) != self.link {
            return Err(FrameError::Magic);
        }
        self.dst = hello.dst;
        self.rx_at += HELLO_LEN;
        self.state = ConnState::Up;
        Ok(true)
    }

    /// Takes the responder's answer to our hello if it is there (the connection is up then);
    /// Ok(None) if not yet. Err: not an answer, or one naming a shard that does not serve
    /// the destination our hello named.
    pub(crate) fn take_answer(&mut self) -> Result<Option<HelloAnswer>, FrameError> {
        let Some(b) = self.received().first_chunk::<ANSWER_LEN>() else {
            return Ok(None);
        };
        let answer = HelloAnswer::decode(b)?;
        let serving = super::shard_of(self.dst, usize::from(answer.shards));
        if serving != usize::from(answer.shard) {
            return Err(FrameError::Shard {
                shard: answer.shard,
                shards: answer.shards,
            });
        }
        self.rx_at += ANSWER_LEN;
        self.state = ConnState::Up;
        Ok(Some(answer))
    }

    /// The next complete frame in the receive buffer (not consumed: [`Conn::consume`]).
    pub(crate) fn next(&self) -> Result<Next, FrameError> {
        Ok(match split_frame(self.received())? {
            None => Next::Nothing,
            Some((h, payload)) => {
                Next::Frame(h, self.rx_at + payload.start..self.rx_at + payload.end)
            }
        })
    }

    /// The bytes received and not consumed yet.
    pub(crate) fn received(&self) -> &[u8] {
        &self.rx[self.rx_at..self.rx_end]
    }

    /// Whether a whole frame (or a malformed header, or a landed frame) waits.
    pub(crate) fn has_frame(&self) -> bool {
        self.state == ConnState::Up
            && (self.landed().is_some()
                || (self.landing.is_none() && !matches!(self.next(), Ok(Next::Nothing))))
    }

    /// The header of the next frame if it is whole and its payload is not (None while a
    /// landing is on).
    pub(crate) fn partial_head(&self) -> Option<FrameHeader> {
        if self.state != ConnState::Up || self.landing.is_some() {
            return None;
        }
        let b = self.received();
        let h = FrameHeader::decode(b.first_chunk::<HEADER_LEN>()?).ok()?;
        (b.len() < HEADER_LEN + h.len as usize).then_some(h)
    }

    /// Receives the rest of the next frame (whose header [`Conn::partial_head`] gave, checked
    /// by the caller) straight into `span`, its payload's target, as long as the payload: what
    /// is buffered of it is copied now, the rest is read into it by the next fills, each of
    /// which reads at most the header of the frame after it (so that one is checked before
    /// its payload comes too). The frame is then [`Conn::landed`].
    pub(crate) fn land(&mut self, span: SharedSpan) -> Result<(), ViewError> {
        let Some(h) = self.partial_head() else {
            return Ok(());
        };
        if span.len() != h.len as usize {
            return Err(ViewError::LengthMismatch(span.len(), h.len as usize));
        }
        let start = self.rx_at + HEADER_LEN;
        span.write_at(0, &self.rx[start..self.rx_end])?;
        self.landing = Some(Landing {
            header: h,
            got: self.rx_end - start,
            len: span.len(),
            span: Some(span),
        });
        self.rx_at = self.rx_end;
        Ok(())
    }

    /// Whether a landing is on (its payload not all received, or not taken yet).
    pub(crate) fn landing(&self) -> bool {
        self.landing.is_some()
    }

    /// The header of the frame whose payload is still being received into its target (a
    /// landing neither revoked nor complete).
    pub(crate) fn landing_into_target(&self) -> Option<FrameHeader> {
        self.landing
            .as_ref()
            .filter(|l| l.span.is_some() && l.got < l.len)
            .map(|l| l.header)
    }

    /// Stops the landing: nothing more is written into its target (whose mapping it lets go
    /// now); the rest of its payload is read and dropped, and [`Conn::landed`] then says the
    /// frame was revoked.
    pub(crate) fn revoke_landing(&mut self) {
        if let Some(l) = self.landing.as_mut() {
            l.span = None;
        }
    }

    /// The header of the frame whose payload all came, not taken yet, and whether the
    /// landing was revoked on the way (part of the payload was dropped).
    pub(crate) fn landed(&self) -> Option<(FrameHeader, bool)> {
        self.landing
            .as_ref()
            .filter(|l| l.got == l.len)
            .map(|l| (l.header, l.span.is_none()))
    }

    /// Takes the landed frame: the next frames come from the receive buffer again.
    pub(crate) fn take_landed(&mut self) {
        if self.landed().is_some() {
            self.landing = None;
        }
    }

    /// Consumes the frame whose payload ends at `end`.
    pub(crate) fn consume(&mut self, end: usize) {
        self.rx_at = end;
    }
}
