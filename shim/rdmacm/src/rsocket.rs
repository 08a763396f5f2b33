//! rsockets: stream sockets over RC QPs of ffv0, set up with this library's rdma_cm
//! (docs/rsockets.md). Each rsocket is a number (an eventfd of its own, so it never collides
//! with the process's other descriptors), an rdma_cm id on an event channel, and once
//! connected a [`Conn`] (slots, CQ, QP) driven by a [`Flow`].
//!
//! rdma_cm events are read off a channel by whoever needs progress ([`pump`]) and filed by id
//! ([`News`]): an accepted socket's id is on its listener's channel, so any socket of that
//! channel may read the events of another.
//!
//! Unsafe code here: the eventfd of a number, reading an event's private data, and the
//! descriptors handed to poll(2).
#![allow(unsafe_code)]

use crate::abi::{RdmaCmId, RdmaConnParam, IBV_QPT_RC};
use crate::cm::{self, Channel, Fail, Id};
use crate::rconn::{Conn, Done};
use crate::rflow::{Arrival, Flow, SLOTS, SLOT_LEN};
use crate::riomap::{self, Announce, OwnMap, OwnMaps, PeerMaps, RECORD_LEN};
use freeflow_os::poll::{poll, PollFd};
use freeflow_proto::cm::{event as ev, port_space};
use std::collections::{HashMap, VecDeque};
use std::ffi::c_int;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Private data of a connect and of its accept: this protocol, version 1; bytes 6-7 carry the
/// sender's RDMA_IOMAPSIZE (little-endian: how many of the other side's maps it takes).
const HELLO: [u8; 8] = *b"FFRS\x01\x00\x00\x00";

fn hello(iomaps: u16) -> [u8; 8] {
    let mut h = HELLO;
    h[6..8].copy_from_slice(&iomaps.to_le_bytes());
    h
}

/// The RDMA_IOMAPSIZE a hello carries (0 when short), capped as ours are.
fn hello_iomaps(private: &[u8]) -> u16 {
    match private.get(6..8) {
        Some(b) => u16::from_le_bytes([b[0], b[1]]).min(riomap::MAX_IOMAPS),
        None => 0,
    }
}

/// How long address and route resolution may take (the router answers at once).
const SETUP_WAIT: Duration = Duration::from_secs(10);
/// How long a blocking call polls its CQ before it sleeps on the completion channel.
const SPIN: Duration = Duration::from_micros(50);
/// How long rclose waits for its last sends to be delivered.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// `SOL_RDMA` and its options (rsocket.h).
pub const SOL_RDMA: c_int = 0x10000;
pub const RDMA_SQSIZE: c_int = 0;
pub const RDMA_RQSIZE: c_int = 1;
pub const RDMA_INLINE: c_int = 2;
pub const RDMA_IOMAPSIZE: c_int = 3;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the rdma_cm said about one id.
#[derive(Default)]
struct News {
    addr_resolved: bool,
    route_resolved: bool,
    established: bool,
    /// The passive side answered with this protocol's private data.
    hello: bool,
    /// The passive side's RDMA_IOMAPSIZE (from its hello).
    peer_iomaps: u16,
    disconnected: bool,
    failed: Option<i32>,
    /// A listener's connection requests: the new id and its private data.
    requests: VecDeque<(usize, Vec<u8>)>,
}

static NEWS: Mutex<Option<HashMap<usize, News>>> = Mutex::new(None);

fn with_news<R>(id: usize, f: impl FnOnce(&mut News) -> R) -> R {
    let mut all = lock(&NEWS);
    f(all.get_or_insert_with(HashMap::new).entry(id).or_default())
}

fn forget_news(id: usize) {
    if let Some(all) = lock(&NEWS).as_mut() {
        all.remove(&id);
    }
}

/// Reads every event waiting on `ch` and files it; an error when the router is gone.
fn pump(ch: &Arc<Channel>) -> Result<(), Fail> {
    loop {
        let event = match cm::get_event(ch, Some(Duration::ZERO)) {
            Ok(e) => e,
            Err(e) if e.errno == libc::ETIMEDOUT || e.errno == libc::EAGAIN => return Ok(()),
            Err(e) => return Err(e),
        };
        let kind = u16::try_from(event.c.event).unwrap_or(u16::MAX);
        let status = event.c.status;
        // SAFETY: rsockets' ids are RDMA_PS_TCP, whose events carry `param.conn`;
        // private_data points into the event, valid for private_data_len bytes until the
        // event is dropped below.
        let private = unsafe {
            {
                let p = event.c.param.conn;
                match p.private_data.is_null() {
                    true => Vec::new(),
                    false => std::slice::from_raw_parts(
                        p.private_data.cast::<u8>(),
                        usize::from(p.private_data_len),
                    )
                    .to_vec(),
                }
            }
        };
        let id = event.c.id as usize;
        match kind {
            ev::CONNECT_REQUEST => {
                let listener = event.c.listen_id as usize;
                with_news(listener, |n| n.requests.push_back((id, private)));
            }
            ev::ADDR_RESOLVED => with_news(id, |n| n.addr_resolved = true),
            ev::ROUTE_RESOLVED => with_news(id, |n| n.route_resolved = true),
            ev::ESTABLISHED => with_news(id, |n| {
                n.established = true;
                n.hello = private.starts_with(&HELLO[..4]);
                n.peer_iomaps = hello_iomaps(&private);
            }),
            ev::DISCONNECTED => with_news(id, |n| n.disconnected = true),
            ev::REJECTED => with_news(id, |n| n.failed = Some(libc::ECONNREFUSED)),
            ev::ADDR_ERROR | ev::ROUTE_ERROR => {
                with_news(id, |n| n.failed = Some(libc::EHOSTUNREACH))
            }
            ev::CONNECT_ERROR | ev::UNREACHABLE => with_news(id, |n| {
                n.failed = Some(if status < 0 { -status } else { libc::ETIMEDOUT })
            }),
            ev::DEVICE_REMOVAL => with_news(id, |n| n.failed = Some(libc::ENODEV)),
            _ => {}
        }
        drop(event);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Fresh,
    Bound,
    Listening,
    Connecting,
    Connected,
    /// Setup failed (the error went to SO_ERROR or the caller).
    Failed,
}

/// Options kept for getsockopt (the ring sizes are fixed; see docs/rsockets.md).
#[derive(Default, Clone, Copy)]
struct Options {
    reuseaddr: c_int,
    keepalive: c_int,
    nodelay: c_int,
    sndbuf: c_int,
    rcvbuf: c_int,
    keepidle: c_int,
    keepintvl: c_int,
    keepcnt: c_int,
    linger: (c_int, c_int),
    rcvtimeo: Option<Duration>,
    sndtimeo: Option<Duration>,
    /// RDMA_IOMAPSIZE: how many of the peer's maps this socket takes (told at connect).
    iomaps: u16,
}

struct Inner {
    state: State,
    nonblocking: bool,
    channel: Arc<Channel>,
    /// The id (a live `Id` of ours until this socket destroys it).
    id: usize,
    conn: Option<Conn>,
    flow: Flow,
    /// A fatal error of the connection (data calls fail with it).
    error: Option<i32>,
    /// SO_ERROR: set by a nonblocking connect that failed, cleared by reading it.
    so_error: i32,
    peer_gone: bool,
    shut_rd: bool,
    shut_wr: bool,
    local: Option<SocketAddrV4>,
    remote: Option<SocketAddrV4>,
    opts: Options,
    /// Our riomaps (their MRs) and the announcements not sent yet.
    own: OwnMaps<usize>,
    /// The peer's riomaps: where riowrite may go.
    peer: PeerMaps,
}

/// One rsocket.
pub struct RSocket {
    number: OwnedFd,
    /// AF_INET or AF_INET6 (the family names are reported in).
    pub family: c_int,
    inner: Mutex<Inner>,
}

static SOCKETS: Mutex<Option<HashMap<RawFd, Arc<RSocket>>>> = Mutex::new(None);

/// The rsocket numbered `fd`.
pub fn get(fd: c_int) -> Result<Arc<RSocket>, Fail> {
    lookup(fd).ok_or_else(|| Fail::new(libc::EBADF, "not an rsocket"))
}

/// The rsocket numbered `fd`, None for any other descriptor.
pub fn lookup(fd: c_int) -> Option<Arc<RSocket>> {
    lock(&SOCKETS).as_ref().and_then(|m| m.get(&fd).cloned())
}

fn new_number() -> Result<OwnedFd, Fail> {
    // SAFETY: eventfd with constant flags; the descriptor is ours.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(Fail::new(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EMFILE),
            "eventfd for the rsocket's number failed",
        ));
    }
    // SAFETY: just made, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn register(rs: RSocket) -> c_int {
    let fd = rs.number.as_raw_fd();
    lock(&SOCKETS)
        .get_or_insert_with(HashMap::new)
        .insert(fd, Arc::new(rs));
    fd
}

fn id_of<'a>(p: usize) -> Result<&'a mut Id, Fail> {
    cm::id(p as *mut RdmaCmId)
}

/// `rsocket(domain, type, protocol)`.
pub fn socket(domain: c_int, kind: c_int, protocol: c_int) -> Result<c_int, Fail> {
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return Err(Fail::new(
            libc::EAFNOSUPPORT,
            "rsockets are AF_INET or AF_INET6",
        ));
    }
    let base = kind & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC);
    if base != libc::SOCK_STREAM {
        return Err(Fail::new(
            libc::EOPNOTSUPP,
            "Freeflow's rsockets are SOCK_STREAM only (no SOCK_DGRAM)",
        ));
    }
    if protocol != 0 && protocol != libc::IPPROTO_TCP {
        return Err(Fail::new(
            libc::EPROTONOSUPPORT,
            "rsockets are TCP-like streams",
        ));
    }
    let number = new_number()?;
    let channel = cm::create_channel(false)?;
    let id = Id::create(
        Some(channel.clone()),
        std::ptr::null_mut(),
        c_int::from(port_space::TCP),
        IBV_QPT_RC,
    )?;
    Ok(register(RSocket {
        number,
        family: domain,
        inner: Mutex::new(Inner {
            state: State::Fresh,
            nonblocking: kind & libc::SOCK_NONBLOCK != 0,
            channel,
            id: id as usize,
            conn: None,
            flow: Flow::new(),
            error: None,
            so_error: 0,
            peer_gone: false,
            shut_rd: false,
            shut_wr: false,
            local: None,
            remote: None,
            opts: Options::default(),
            own: OwnMaps::new(0),
            peer: PeerMaps::new(0),
        }),
    }))
}

/// Connect or accept parameters carrying `hello` (which must outlive the call they go to).
fn hello_param(hello: &[u8; 8]) -> RdmaConnParam {
    RdmaConnParam {
        private_data: hello.as_ptr().cast(),
        private_data_len: hello.len() as u8,
        responder_resources: 0,
        initiator_depth: 0,
        flow_control: 0,
        retry_count: 7,
        rnr_retry_count: 7,
        srq: 0,
        qp_num: 0,
    }
}

/// An address of an id's route (its `sockaddr_storage`).
fn route_addr(st: &libc::sockaddr_storage) -> Option<SocketAddrV4> {
    cm::read_sockaddr((st as *const libc::sockaddr_storage).cast())
        .ok()
        .flatten()
}

/// What [`RSocket::after_send_pass`] decided: return this, or go round again.
enum SendPass<'a> {
    Return(Result<usize, Fail>),
    Again(MutexGuard<'a, Inner>),
}

/// A post failed after `done` bytes of a send-like call went: the connection is broken
/// (ECONNRESET from now on); the call reports what it sent, or the error if nothing.
fn broken_after(s: &mut Inner, done: usize, e: Fail) -> Result<usize, Fail> {
    s.error = Some(libc::ECONNRESET);
    match done {
        0 => Err(e),
        n => Ok(n),
    }
}

fn would_block() -> Fail {
    Fail::new(libc::EAGAIN, "would block")
}

impl RSocket {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    pub fn bind(&self, addr: SocketAddrV4) -> Result<(), Fail> {
        let mut s = self.inner();
        if s.state != State::Fresh {
            return Err(Fail::new(libc::EINVAL, "already bound"));
        }
        let id = id_of(s.id)?;
        id.bind(addr)?;
        s.local = route_addr(&id.c.route.addr.src);
        s.state = State::Bound;
        Ok(())
    }

    pub fn listen(&self, backlog: c_int) -> Result<(), Fail> {
        let mut s = self.inner();
        match s.state {
            State::Fresh | State::Bound => {}
            State::Listening => return Ok(()),
            _ => return Err(Fail::new(libc::EINVAL, "not a socket that can listen")),
        }
        let id = id_of(s.id)?;
        id.listen(backlog.clamp(1, 1024))?;
        s.local = route_addr(&id.c.route.addr.src);
        s.state = State::Listening;
        Ok(())
    }

    /// Waits until `fd` is readable or `deadline` (None: for ever); false when the time is up.
    fn wait_fds(fds: &[RawFd], deadline: Option<Instant>) -> Result<Vec<bool>, Fail> {
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if timeout.is_some_and(|t| t.is_zero()) {
            return Err(Fail::new(libc::EAGAIN, "timed out"));
        }
        let mut pfds: Vec<PollFd<'_>> = fds
            .iter()
            .map(|&fd| {
                // SAFETY: descriptors owned by live objects of this socket for this call.
                PollFd::new(unsafe { BorrowedFd::borrow_raw(fd) }, libc::POLLIN)
            })
            .collect();
        match poll(&mut pfds, timeout) {
            Ok(_) => Ok(pfds.iter().map(|p| p.revents() != 0).collect()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                Err(Fail::new(libc::EINTR, "interrupted"))
            }
            Err(e) => Err(Fail::new(
                e.raw_os_error().unwrap_or(libc::EIO),
                "poll failed",
            )),
        }
    }

    pub fn accept(&self) -> Result<(c_int, Option<SocketAddrV4>), Fail> {
        loop {
            let s = self.inner();
            if s.state != State::Listening {
                return Err(Fail::new(libc::EINVAL, "not listening"));
            }
            pump(&s.channel)?;
            let next = with_news(s.id, |n| n.requests.pop_front());
            if let Some((child, private)) = next {
                let channel = s.channel.clone();
                let family = self.family;
                let opts = s.opts;
                drop(s);
                match accept_one(child, &private, channel, family, opts) {
                    Ok(r) => return Ok(r),
                    Err(e) if e.errno == libc::ECONNABORTED => {
                        crate::debug(format_args!("raccept: a request refused: {}", e.why));
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            if s.nonblocking {
                return Err(would_block());
            }
            let deadline = s.opts.rcvtimeo.map(|t| Instant::now() + t);
            let fd = s.channel.c.fd;
            drop(s);
            Self::wait_fds(&[fd], deadline)?;
        }
    }

    pub fn connect(&self, dst: SocketAddrV4) -> Result<(), Fail> {
        let mut s = self.inner();
        match s.state {
            State::Fresh | State::Bound => {}
            State::Connecting => {
                let ch = s.channel.clone();
                pump(&ch)?;
                progress(&mut s);
                return match s.state {
                    State::Connected => Err(Fail::new(libc::EISCONN, "connected")),
                    State::Connecting => Err(Fail::new(libc::EALREADY, "connecting")),
                    _ => Err(Fail::new(
                        std::mem::take(&mut s.so_error).max(libc::ECONNREFUSED),
                        "connect failed",
                    )),
                };
            }
            State::Connected => return Err(Fail::new(libc::EISCONN, "already connected")),
            _ => return Err(Fail::new(libc::EINVAL, "cannot connect this socket")),
        }
        let id_ptr = s.id;
        let channel = s.channel.clone();
        let id = id_of(id_ptr)?;
        let result = (|| -> Result<Conn, Fail> {
            id.resolve_addr(s.local, dst, crate::cm::DEFAULT_RESOLVE_TIMEOUT_MS)?;
            wait_news(&channel, id_ptr, |n| n.addr_resolved)?;
            id.resolve_route()?;
            wait_news(&channel, id_ptr, |n| n.route_resolved)?;
            let conn = Conn::create(id)?;
            let hello = hello(s.opts.iomaps);
            let param = hello_param(&hello);
            if let Err(e) = id.connect(Some(&param)) {
                id.destroy_qp();
                conn.destroy(None);
                return Err(e);
            }
            Ok(conn)
        })();
        match result {
            Ok(conn) => {
                s.conn = Some(conn);
                s.local = route_addr(&id.c.route.addr.src);
                s.remote = Some(dst);
                s.state = State::Connecting;
            }
            Err(e) => {
                s.state = State::Failed;
                return Err(e);
            }
        }
        if s.nonblocking {
            return Err(Fail::new(libc::EINPROGRESS, "connecting"));
        }
        loop {
            let ch = s.channel.clone();
            pump(&ch)?;
            progress(&mut s);
            match s.state {
                State::Connected => return Ok(()),
                State::Connecting => {}
                _ => {
                    let errno = std::mem::take(&mut s.so_error);
                    return Err(Fail::new(
                        if errno == 0 {
                            libc::ECONNREFUSED
                        } else {
                            errno
                        },
                        "the connection was not established",
                    ));
                }
            }
            let fd = s.channel.c.fd;
            drop(s);
            Self::wait_fds(&[fd], None)?;
            s = self.inner();
        }
    }

    /// Receives into `bufs` (scatter list); `peek` leaves the bytes, `dontwait` never blocks,
    /// `waitall` fills every buffer unless EOF or an error comes first.
    pub fn recv(
        &self,
        bufs: &mut [&mut [u8]],
        peek: bool,
        dontwait: bool,
        waitall: bool,
    ) -> Result<usize, Fail> {
        let want: usize = bufs.iter().map(|b| b.len()).sum();
        let mut got = 0usize;
        let mut s = self.inner();
        loop {
            if s.state != State::Connected {
                return Err(Fail::new(libc::ENOTCONN, "not connected"));
            }
            drain(&mut s);
            if s.flow.readable_bytes() > 0 && !s.shut_rd {
                got += copy_out(&mut s, bufs, got, peek);
                if got == want || !waitall || peek {
                    return Ok(got);
                }
                continue;
            }
            if got > 0 && (!waitall || s.flow.at_eof() || s.peer_gone) {
                return Ok(got);
            }
            if s.shut_rd || s.flow.at_eof() {
                return Ok(got);
            }
            if let Some(e) = s.error {
                return Err(Fail::new(e, "the connection failed"));
            }
            if s.peer_gone {
                // Everything the peer sent before its disconnect is read; without its FIN
                // (killed, or gone without rclose) the stream was cut: ECONNRESET.
                return match got {
                    0 => Err(Fail::new(
                        libc::ECONNRESET,
                        "the peer disconnected without closing its stream",
                    )),
                    n => Ok(n),
                };
            }
            if s.nonblocking || dontwait {
                if got > 0 {
                    return Ok(got);
                }
                // Before EAGAIN, the rdma_cm's news: a peer that went is EOF, not EAGAIN
                // for ever.
                if !refresh(&mut s) {
                    return Err(would_block());
                }
                continue;
            }
            let deadline = s.opts.rcvtimeo.map(|t| Instant::now() + t);
            s = self.block(s, deadline)?;
        }
    }

    pub fn send(&self, bufs: &[&[u8]], dontwait: bool) -> Result<usize, Fail> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut sent = 0usize;
        let mut s = self.inner();
        loop {
            if s.state != State::Connected {
                return Err(Fail::new(libc::ENOTCONN, "not connected"));
            }
            drain(&mut s);
            if s.shut_wr {
                return Err(Fail::new(libc::EPIPE, "shut down for writing"));
            }
            if let Some(e) = s.error {
                return match sent {
                    0 => Err(Fail::new(e, "the connection failed")),
                    n => Ok(n),
                };
            }
            if s.peer_gone {
                return match sent {
                    0 => Err(Fail::new(libc::ECONNRESET, "the peer disconnected")),
                    n => Ok(n),
                };
            }
            while sent < total && s.own.next_pending().is_none() {
                let Some((slot, imm)) = s.flow.take_data_send() else {
                    break;
                };
                let conn = s.conn.as_mut().expect("connected");
                let n = gather(bufs, sent, conn.send_buf(slot));
                if let Err(e) = conn.post_send(Some(slot), n, imm) {
                    return broken_after(&mut s, sent, e);
                }
                sent += n;
            }
            s = match self.after_send_pass(s, sent, total, dontwait) {
                SendPass::Again(s) => s,
                SendPass::Return(result) => return result,
            };
        }
    }

    /// What a send-like call does after a pass that moved `done` of `total` bytes: returns
    /// what it sent when it is done (or may not wait), else waits for room (a blocking
    /// socket, up to SO_SNDTIMEO) and goes round again.
    fn after_send_pass<'a>(
        &'a self,
        mut s: MutexGuard<'a, Inner>,
        done: usize,
        total: usize,
        dontwait: bool,
    ) -> SendPass<'a> {
        if done == total || (done > 0 && (s.nonblocking || dontwait)) {
            return SendPass::Return(Ok(done));
        }
        if s.nonblocking || dontwait {
            // As in recv: a peer that went is ECONNRESET, not EAGAIN for ever.
            if !refresh(&mut s) {
                return SendPass::Return(Err(would_block()));
            }
            return SendPass::Again(s);
        }
        let deadline = s.opts.sndtimeo.map(|t| Instant::now() + t);
        match self.block(s, deadline) {
            Ok(s) => SendPass::Again(s),
            Err(e) if done > 0 && e.errno == libc::EAGAIN => SendPass::Return(Ok(done)),
            Err(e) => SendPass::Return(Err(e)),
        }
    }

    /// `riomap`: registers the program's `len` bytes at `addr` and, for PROT_WRITE, announces
    /// them to the peer (in order with the stream) at riowrite offset `offset` (-1: the
    /// address). Returns the offset.
    pub fn riomap(&self, addr: u64, len: usize, prot: c_int, offset: i64) -> Result<i64, Fail> {
        if prot & !libc::PROT_WRITE != 0 {
            return Err(Fail::new(
                libc::EINVAL,
                "riomap takes PROT_WRITE or PROT_NONE only",
            ));
        }
        if len == 0 || len as u64 > riomap::MAX_MAP_LEN || addr == 0 {
            return Err(Fail::new(
                libc::EINVAL,
                "riomap: no buffer, or a length of 0 or beyond 4 GiB",
            ));
        }
        let offset = match offset {
            -1 => i64::try_from(addr)
                .map_err(|_| Fail::new(libc::EINVAL, "riomap: an address beyond off_t"))?,
            o if o < 0 => return Err(Fail::new(libc::EINVAL, "riomap: a negative offset")),
            o => o,
        };
        if (offset as u64).checked_add(len as u64).is_none()
            || addr.checked_add(len as u64).is_none()
        {
            return Err(Fail::new(libc::EINVAL, "riomap: the range wraps"));
        }
        let mut s = self.inner();
        if s.state != State::Connected {
            return Err(Fail::new(
                libc::EINVAL,
                "riomap needs a connected rsocket (the peer's RDMA_IOMAPSIZE is learnt at connect)",
            ));
        }
        let writable = prot & libc::PROT_WRITE != 0;
        let index = match writable {
            false => None,
            true => Some(s.own.free_index().ok_or_else(|| {
                Fail::new(
                    libc::ENOMEM,
                    "riomap: the peer's map table is full (its RDMA_IOMAPSIZE; 0 unless it set one)",
                )
            })?),
        };
        let (mr, rkey) = Conn::register(addr, len, writable)?;
        s.own.add(
            OwnMap {
                addr,
                len,
                offset: offset as u64,
                mr,
                index,
            },
            rkey,
        );
        drain(&mut s);
        Ok(offset)
    }

    /// `riounmap`: the map of exactly (addr, len) goes: deregistered at once (a write of the
    /// peer's that arrives later fails at the router's key check) and withdrawn from the
    /// peer's table in order with the stream.
    pub fn riounmap(&self, addr: u64, len: usize) -> Result<(), Fail> {
        let mut s = self.inner();
        let map = s.own.remove(addr, len).ok_or_else(|| {
            Fail::new(
                libc::EINVAL,
                "riounmap: no riomap of this address and length",
            )
        })?;
        Conn::deregister(map.mr);
        if s.state == State::Connected {
            drain(&mut s);
        }
        Ok(())
    }

    /// `riowrite`: RDMA-WRITEs `buf` into the peer's maps from riowrite offset `offset` on,
    /// in order with the stream (after every earlier send, before every later one). A write
    /// that runs past the end of the map it starts in stops there (a short count); one that
    /// starts outside every map the peer announced is EINVAL.
    pub fn riowrite(&self, buf: &[u8], offset: u64, dontwait: bool) -> Result<usize, Fail> {
        let total = buf.len();
        let mut done = 0usize;
        let mut s = self.inner();
        loop {
            if s.state != State::Connected {
                return Err(Fail::new(libc::ENOTCONN, "not connected"));
            }
            drain(&mut s);
            if s.shut_wr {
                return Err(Fail::new(libc::EPIPE, "shut down for writing"));
            }
            if let Some(e) = s.error.or(s.peer_gone.then_some(libc::ECONNRESET)) {
                return match done {
                    0 => Err(Fail::new(e, "the connection failed")),
                    n => Ok(n),
                };
            }
            while done < total && s.own.next_pending().is_none() {
                let at = offset.saturating_add(done as u64);
                let (addr, rkey, fit) = match s.peer.target(at, total - done) {
                    Ok(t) => t,
                    Err(_) if done > 0 => return Ok(done),
                    Err(e) => {
                        return Err(Fail::new(
                            libc::EINVAL,
                            format!("riowrite at offset {at}: {}", e.0),
                        ))
                    }
                };
                let Some(slot) = s.flow.take_write_slot() else {
                    break;
                };
                let n = fit.min(SLOT_LEN);
                let conn = s.conn.as_mut().expect("connected");
                conn.send_buf(slot)[..n].copy_from_slice(&buf[done..done + n]);
                if let Err(e) = conn.post_write(slot, n, addr, rkey) {
                    return broken_after(&mut s, done, e);
                }
                done += n;
            }
            s = match self.after_send_pass(s, done, total, dontwait) {
                SendPass::Again(s) => s,
                SendPass::Return(result) => return result,
            };
        }
    }

    /// Sleeps until the CQ or the channel wakes this socket (or `deadline`: EAGAIN).
    fn block<'a>(
        &'a self,
        mut s: MutexGuard<'a, Inner>,
        deadline: Option<Instant>,
    ) -> Result<MutexGuard<'a, Inner>, Fail> {
        if s.conn.is_none() {
            return Err(Fail::new(libc::ENOTCONN, "not connected"));
        }
        // A short spin first (as rdma-core's rsockets poll before they block): an answer that
        // comes within it costs no wake-up through the completion channel.
        let before = readiness(&s);
        let spin_until = Instant::now() + SPIN;
        while Instant::now() < spin_until {
            drain(&mut s);
            if readiness(&s) != before || s.error.is_some() {
                return Ok(s);
            }
        }
        let conn = s.conn.as_mut().expect("checked above");
        if let Err(e) = conn.arm() {
            s.error = Some(libc::ECONNRESET);
            return Err(e);
        }
        let wake = conn.wake_fd();
        // What came before the arming is not announced: look once more.
        let before = readiness(&s);
        drain(&mut s);
        if readiness(&s) != before || s.error.is_some() {
            return Ok(s);
        }
        let chan = s.channel.c.fd;
        drop(s);
        let woke = Self::wait_fds(&[wake, chan], deadline)?;
        let mut s = self.inner();
        if woke[0] {
            if let Some(conn) = s.conn.as_mut() {
                if let Err(e) = conn.take_wakeup() {
                    crate::debug(format_args!("{}", e.why));
                    s.error = Some(libc::ECONNRESET);
                }
            }
        }
        if woke[1] {
            let ch = s.channel.clone();
            if let Err(e) = pump(&ch) {
                crate::debug(format_args!("rdma_cm channel: {}", e.why));
                s.error = Some(libc::ECONNRESET);
            }
        }
        Ok(s)
    }

    pub fn shutdown(&self, how: c_int) -> Result<(), Fail> {
        let mut s = self.inner();
        if s.state != State::Connected {
            return Err(Fail::new(libc::ENOTCONN, "not connected"));
        }
        if how == libc::SHUT_RD || how == libc::SHUT_RDWR {
            s.shut_rd = true;
        }
        if how == libc::SHUT_WR || how == libc::SHUT_RDWR {
            s.shut_wr = true;
            drain(&mut s);
        }
        Ok(())
    }

    /// poll(2)'s revents for `events`, after taking what is waiting.
    pub fn poll_events(&self, events: i16) -> i16 {
        let mut s = self.inner();
        let ch = s.channel.clone();
        if let Err(e) = pump(&ch) {
            crate::debug(format_args!("rdma_cm channel: {}", e.why));
            s.error = Some(libc::ECONNRESET);
        }
        progress(&mut s);
        let mut r: i16 = 0;
        match s.state {
            State::Listening => {
                if with_news(s.id, |n| !n.requests.is_empty()) {
                    r |= libc::POLLIN;
                }
            }
            State::Connected => {
                drain(&mut s);
                if s.flow.readable_bytes() > 0 || s.flow.at_eof() || s.shut_rd || s.peer_gone {
                    r |= libc::POLLIN;
                }
                // After the peer's end a write does not block: it fails (ECONNRESET).
                if (s.flow.can_send_data() && !s.shut_wr) || s.peer_gone {
                    r |= libc::POLLOUT;
                }
                // As TCP: a hang-up once both directions are closed (the peer's end alone
                // is readable EOF).
                if (s.peer_gone || s.flow.at_eof()) && s.shut_wr {
                    r |= libc::POLLHUP;
                }
                if s.error.is_some() {
                    r |= libc::POLLERR | libc::POLLIN | libc::POLLOUT;
                }
            }
            State::Failed => r |= libc::POLLERR | libc::POLLOUT | libc::POLLHUP,
            State::Connecting => {}
            State::Fresh | State::Bound => r |= libc::POLLOUT | libc::POLLHUP,
        }
        r & (events | libc::POLLERR | libc::POLLHUP)
    }

    /// Prepares to sleep in rpoll: the descriptors that wake this socket. None: something is
    /// ready already (poll again at once).
    pub fn wake_fds(&self) -> Option<Vec<RawFd>> {
        let mut s = self.inner();
        let mut fds = vec![s.channel.c.fd];
        if let Some(conn) = s.conn.as_mut() {
            if conn.arm().is_err() {
                s.error = Some(libc::ECONNRESET);
                return None;
            }
            fds.push(conn.wake_fd());
            let before = (s.flow.readable_bytes(), s.flow.can_send_data());
            drain(&mut s);
            if (s.flow.readable_bytes(), s.flow.can_send_data()) != before {
                return None;
            }
        }
        Some(fds)
    }

    /// After rpoll's sleep: takes the completion channel's wake-up if `fd` is it.
    pub fn woken(&self, fd: RawFd) {
        let mut s = self.inner();
        let Some(conn) = s.conn.as_mut() else {
            return;
        };
        if conn.wake_fd() == fd {
            if let Err(e) = conn.take_wakeup() {
                crate::debug(format_args!("{}", e.why));
                s.error = Some(libc::ECONNRESET);
            }
        }
    }

    pub fn names(&self) -> (Option<SocketAddrV4>, Option<SocketAddrV4>) {
        let s = self.inner();
        (s.local, s.remote)
    }

    pub fn is_connected(&self) -> bool {
        self.inner().state == State::Connected
    }

    pub fn nonblocking(&self) -> bool {
        self.inner().nonblocking
    }

    pub fn set_nonblocking(&self, on: bool) {
        self.inner().nonblocking = on;
    }

    pub fn set_option(&self, level: c_int, name: c_int, value: &[u8]) -> Result<(), Fail> {
        let int = || -> Result<c_int, Fail> {
            let b: [u8; 4] = value
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| Fail::new(libc::EINVAL, "option value too short"))?;
            Ok(c_int::from_ne_bytes(b))
        };
        let timeval = || -> Result<Option<Duration>, Fail> {
            if value.len() < 16 {
                return Err(Fail::new(libc::EINVAL, "timeval too short"));
            }
            let sec = i64::from_ne_bytes(value[..8].try_into().expect("8"));
            let usec = i64::from_ne_bytes(value[8..16].try_into().expect("8"));
            if sec < 0 || !(0..1_000_000).contains(&usec) {
                return Err(Fail::new(libc::EDOM, "bad timeval"));
            }
            let d = Duration::from_secs(sec as u64) + Duration::from_micros(usec as u64);
            Ok((!d.is_zero()).then_some(d))
        };
        let mut s = self.inner();
        let o = &mut s.opts;
        match (level, name) {
            (libc::SOL_SOCKET, libc::SO_REUSEADDR) => o.reuseaddr = int()?,
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE) => o.keepalive = int()?,
            (libc::SOL_SOCKET, libc::SO_SNDBUF) => o.sndbuf = int()?,
            (libc::SOL_SOCKET, libc::SO_RCVBUF) => o.rcvbuf = int()?,
            (libc::SOL_SOCKET, libc::SO_RCVTIMEO) => o.rcvtimeo = timeval()?,
            (libc::SOL_SOCKET, libc::SO_SNDTIMEO) => o.sndtimeo = timeval()?,
            (libc::SOL_SOCKET, libc::SO_LINGER) => {
                let on = int()?;
                let secs = value
                    .get(4..8)
                    .map_or(0, |b| c_int::from_ne_bytes(b.try_into().expect("4")));
                o.linger = (on, secs);
            }
            (libc::IPPROTO_TCP, libc::TCP_NODELAY) => o.nodelay = int()?,
            (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE) => o.keepidle = int()?,
            (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL) => o.keepintvl = int()?,
            (libc::IPPROTO_TCP, libc::TCP_KEEPCNT) => o.keepcnt = int()?,
            // Queue sizes and inline data are hints; this protocol's are fixed.
            (SOL_RDMA, RDMA_SQSIZE | RDMA_RQSIZE | RDMA_INLINE) => {
                int()?;
            }
            (SOL_RDMA, RDMA_IOMAPSIZE) => {
                let v = int()?;
                if !matches!(s.state, State::Fresh | State::Bound | State::Listening) {
                    return Err(Fail::new(
                        libc::EINVAL,
                        "RDMA_IOMAPSIZE is told to the peer at connect: set it before",
                    ));
                }
                s.opts.iomaps = riomap::iomap_size_option(v)
                    .ok_or_else(|| Fail::new(libc::EINVAL, "a negative RDMA_IOMAPSIZE"))?;
            }
            _ => {
                return Err(Fail::new(
                    libc::ENOPROTOOPT,
                    format!("option {level}/{name} not supported by Freeflow's rsockets"),
                ))
            }
        }
        Ok(())
    }

    /// The option's value as bytes.
    pub fn get_option(&self, level: c_int, name: c_int) -> Result<Vec<u8>, Fail> {
        let mut s = self.inner();
        progress(&mut s);
        let int = |v: c_int| Ok(v.to_ne_bytes().to_vec());
        let o = s.opts;
        let tv = |d: Option<Duration>| {
            let d = d.unwrap_or_default();
            let mut v = (d.as_secs() as i64).to_ne_bytes().to_vec();
            v.extend_from_slice(&i64::from(d.subsec_micros()).to_ne_bytes());
            Ok(v)
        };
        let ring = (usize::from(SLOTS) * SLOT_LEN) as c_int;
        match (level, name) {
            (libc::SOL_SOCKET, libc::SO_ERROR) => int(std::mem::take(&mut s.so_error)),
            (libc::SOL_SOCKET, libc::SO_TYPE) => int(libc::SOCK_STREAM),
            (libc::SOL_SOCKET, libc::SO_DOMAIN) => int(self.family),
            (libc::SOL_SOCKET, libc::SO_PROTOCOL) => int(libc::IPPROTO_TCP),
            (libc::SOL_SOCKET, libc::SO_ACCEPTCONN) => {
                int(c_int::from(s.state == State::Listening))
            }
            (libc::SOL_SOCKET, libc::SO_REUSEADDR) => int(o.reuseaddr),
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE) => int(o.keepalive),
            (libc::SOL_SOCKET, libc::SO_SNDBUF) => int(if o.sndbuf > 0 { o.sndbuf } else { ring }),
            (libc::SOL_SOCKET, libc::SO_RCVBUF) => int(if o.rcvbuf > 0 { o.rcvbuf } else { ring }),
            (libc::SOL_SOCKET, libc::SO_RCVTIMEO) => tv(o.rcvtimeo),
            (libc::SOL_SOCKET, libc::SO_SNDTIMEO) => tv(o.sndtimeo),
            (libc::SOL_SOCKET, libc::SO_LINGER) => {
                let mut v = o.linger.0.to_ne_bytes().to_vec();
                v.extend_from_slice(&o.linger.1.to_ne_bytes());
                Ok(v)
            }
            (libc::IPPROTO_TCP, libc::TCP_NODELAY) => int(o.nodelay),
            (libc::IPPROTO_TCP, libc::TCP_MAXSEG) => int(SLOT_LEN as c_int),
            (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE) => int(o.keepidle),
            (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL) => int(o.keepintvl),
            (libc::IPPROTO_TCP, libc::TCP_KEEPCNT) => int(o.keepcnt),
            (SOL_RDMA, RDMA_SQSIZE | RDMA_RQSIZE) => int(c_int::from(SLOTS)),
            (SOL_RDMA, RDMA_INLINE) => int(0),
            (SOL_RDMA, RDMA_IOMAPSIZE) => int(c_int::from(o.iomaps)),
            _ => Err(Fail::new(
                libc::ENOPROTOOPT,
                format!("option {level}/{name} not supported by Freeflow's rsockets"),
            )),
        }
    }
}

/// Waits (bounded) for news of `id` on `ch`: `done`, or its failure.
fn wait_news(ch: &Arc<Channel>, id: usize, done: impl Fn(&News) -> bool) -> Result<(), Fail> {
    let deadline = Instant::now() + SETUP_WAIT;
    loop {
        pump(ch)?;
        let (ok, failed) = with_news(id, |n| (done(n), n.failed));
        if let Some(e) = failed {
            return Err(Fail::new(e, "the rdma_cm refused the connection's setup"));
        }
        if ok {
            return Ok(());
        }
        if RSocket::wait_fds(&[ch.c.fd], Some(deadline)).is_err() && Instant::now() >= deadline {
            return Err(Fail::new(libc::ETIMEDOUT, "no rdma_cm answer in time"));
        }
    }
}

/// Reads the socket's channel and takes its news; whether something changed that a caller
/// about to say EAGAIN must look at (the peer's end, an error).
fn refresh(s: &mut Inner) -> bool {
    let ch = s.channel.clone();
    if let Err(e) = pump(&ch) {
        crate::debug(format_args!("rdma_cm channel: {}", e.why));
        s.error = Some(libc::ECONNRESET);
        return true;
    }
    let before = s.peer_gone;
    drain(s);
    s.peer_gone != before
}

/// Makes the socket of an accepted request, or refuses it.
fn accept_one(
    child: usize,
    private: &[u8],
    channel: Arc<Channel>,
    family: c_int,
    opts: Options,
) -> Result<(c_int, Option<SocketAddrV4>), Fail> {
    let id = id_of(child)?;
    // The request is refused (the peer gets REJECTED) and its id goes.
    let refuse = |id: &mut Id, why: &str| -> Fail {
        let _ = id.reject(Vec::new());
        let _ = Id::destroy(child as *mut Id);
        forget_news(child);
        Fail::new(libc::ECONNABORTED, why)
    };
    if !private.starts_with(&HELLO[..4]) {
        return Err(refuse(
            id,
            "a connect that is not an rsocket's (no FFRS hello)",
        ));
    }
    let number = match new_number() {
        Ok(n) => n,
        Err(e) => {
            let errno = e.errno;
            let mut f = refuse(id, &e.why);
            // Out of descriptors is the program's to hear (EMFILE), as accept(2) says it.
            f.errno = errno;
            return Err(f);
        }
    };
    let conn = match Conn::create(id) {
        Ok(c) => c,
        Err(e) => return Err(refuse(id, &e.why)),
    };
    let hello = hello(opts.iomaps);
    let param = hello_param(&hello);
    if let Err(e) = id.accept(Some(&param)) {
        conn.destroy(Some(id));
        return Err(refuse(id, &e.why));
    }
    let local = route_addr(&id.c.route.addr.src);
    let remote = route_addr(&id.c.route.addr.dst);
    let fd = register(RSocket {
        number,
        family,
        inner: Mutex::new(Inner {
            state: State::Connected,
            nonblocking: false,
            channel,
            id: child,
            conn: Some(conn),
            flow: Flow::new(),
            error: None,
            so_error: 0,
            peer_gone: false,
            shut_rd: false,
            shut_wr: false,
            local,
            remote,
            opts: Options {
                rcvtimeo: None,
                sndtimeo: None,
                ..opts
            },
            own: OwnMaps::new(hello_iomaps(private)),
            peer: PeerMaps::new(opts.iomaps),
        }),
    });
    Ok((fd, remote))
}

/// Moves a connecting socket on with its news (without reading the channel).
fn progress(s: &mut Inner) {
    if s.state != State::Connecting {
        return;
    }
    let (established, hello, failed) = with_news(s.id, |n| (n.established, n.hello, n.failed));
    if let Some(e) = failed {
        s.state = State::Failed;
        s.so_error = e;
    } else if established && !hello {
        crate::debug(format_args!(
            "rconnect: the server is not an rsocket (no FFRS hello)"
        ));
        if let Ok(id) = id_of(s.id) {
            let _ = id.disconnect();
        }
        s.state = State::Failed;
        s.so_error = libc::ECONNREFUSED;
    } else if established {
        s.state = State::Connected;
        s.own = OwnMaps::new(with_news(s.id, |n| n.peer_iomaps));
        s.peer = PeerMaps::new(s.opts.iomaps);
    }
}

/// Takes every completion, reposts free receives, sends the credit update and FIN when due,
/// and notes a disconnect (read before the completions, so that the peer's last messages are
/// in before its end is believed).
fn drain(s: &mut Inner) {
    progress(s);
    if s.state != State::Connected {
        return;
    }
    if !s.peer_gone && with_news(s.id, |n| n.disconnected) {
        s.peer_gone = true;
    }
    let Some(conn) = s.conn.as_mut() else {
        return;
    };
    loop {
        let done = conn.poll();
        if done.is_empty() {
            break;
        }
        for d in done {
            match d {
                Done::Received { slot, len, imm } => match s.flow.received(slot, len, imm) {
                    Ok(Arrival::Empty) => match conn.post_recv(slot) {
                        Ok(()) => s.flow.reposted(),
                        Err(_) => s.error = Some(libc::ECONNRESET),
                    },
                    Ok(Arrival::Map) => {
                        let applied = Announce::decode(conn.received(slot, 0, len))
                            .and_then(|a| s.peer.apply(a));
                        if let Err(e) = applied {
                            crate::debug(format_args!("rsocket peer broke the protocol: {}", e.0));
                            s.error = Some(libc::ECONNRESET);
                        }
                        match conn.post_recv(slot) {
                            Ok(()) => s.flow.reposted(),
                            Err(_) => s.error = Some(libc::ECONNRESET),
                        }
                    }
                    Ok(Arrival::Data) => {}
                    Err(e) => {
                        crate::debug(format_args!("rsocket peer broke the protocol: {}", e.0));
                        s.error = Some(libc::ECONNRESET);
                    }
                },
                Done::Sent { slot } => s.flow.send_done(slot),
                Done::Failed(status) => {
                    if !s.peer_gone && s.error.is_none() {
                        crate::debug(format_args!(
                            "rsocket: a work request failed (status {status}): the peer or \
                             the router went"
                        ));
                        s.error = Some(libc::ECONNRESET);
                    }
                }
            }
        }
    }
    if s.error.is_some() || s.peer_gone {
        return;
    }
    if let Some(imm) = s.flow.take_credit_update() {
        if conn.post_send(None, 0, imm).is_err() {
            s.error = Some(libc::ECONNRESET);
        }
    }
    flush_maps(s);
    if s.shut_wr && !s.flow.fin_sent() {
        if let (Some(imm), Some(conn)) = (s.flow.take_fin(), s.conn.as_mut()) {
            if conn.post_send(None, 0, imm).is_err() {
                s.error = Some(libc::ECONNRESET);
            }
        }
    }
}

/// Sends the map announcements waiting, in order, as far as credits and slots allow (before
/// any later data: `send` and `riowrite` send nothing while one waits).
fn flush_maps(s: &mut Inner) {
    while let Some(a) = s.own.next_pending() {
        if s.error.is_some() || s.peer_gone || s.flow.fin_sent() {
            return;
        }
        let Some((slot, imm)) = s.flow.take_map_send() else {
            return;
        };
        let Some(conn) = s.conn.as_mut() else {
            return;
        };
        conn.send_buf(slot)[..RECORD_LEN].copy_from_slice(&a.encode());
        if conn.post_send(Some(slot), RECORD_LEN, imm).is_err() {
            s.error = Some(libc::ECONNRESET);
            return;
        }
        s.own.sent();
    }
}

/// What a blocked call waits to change: unread bytes, room for data, free send slots.
fn readiness(s: &Inner) -> (usize, bool, usize) {
    (
        s.flow.readable_bytes(),
        s.flow.can_send_data(),
        s.flow.free_slots(),
    )
}

/// Copies unread bytes into `bufs` from byte `at` of the scatter list on; reposts each slot
/// read to its end (unless peeking). Returns the bytes copied.
fn copy_out(s: &mut Inner, bufs: &mut [&mut [u8]], at: usize, peek: bool) -> usize {
    let mut copied = 0usize;
    let mut skip_runs = 0usize;
    let mut peek_offset = 0usize;
    let conn = s.conn.as_mut().expect("connected");
    // Position in the scatter list.
    let (mut bi, mut bo) = locate(bufs, at);
    while bi < bufs.len() {
        let next = if peek {
            s.flow
                .nth_unread(skip_runs)
                .map(|(sl, off, len)| (sl, off + peek_offset, len - peek_offset))
        } else {
            s.flow.next_unread()
        };
        let Some((slot, offset, len)) = next else {
            break;
        };
        let room = bufs[bi].len() - bo;
        let n = room.min(len);
        bufs[bi][bo..bo + n].copy_from_slice(conn.received(slot, offset, n));
        copied += n;
        bo += n;
        if bo == bufs[bi].len() {
            bi += 1;
            bo = 0;
        }
        if peek {
            if n == len {
                skip_runs += 1;
                peek_offset = 0;
            } else {
                peek_offset += n;
            }
        } else if let Some(slot) = s.flow.consume(n) {
            match conn.post_recv(slot) {
                Ok(()) => s.flow.reposted(),
                Err(_) => s.error = Some(libc::ECONNRESET),
            }
        }
    }
    if !peek {
        if let Some(imm) = s.flow.take_credit_update() {
            if conn.post_send(None, 0, imm).is_err() {
                s.error = Some(libc::ECONNRESET);
            }
        }
    }
    copied
}

/// (buffer index, offset in it) of byte `at` of a scatter list.
fn locate(bufs: &[&mut [u8]], mut at: usize) -> (usize, usize) {
    for (i, b) in bufs.iter().enumerate() {
        if at < b.len() {
            return (i, at);
        }
        at -= b.len();
    }
    (bufs.len(), 0)
}

/// Copies the gather list's bytes from byte `from` on into `slot` (as many as fit).
fn gather(bufs: &[&[u8]], mut from: usize, slot: &mut [u8]) -> usize {
    let mut n = 0;
    for b in bufs {
        if from >= b.len() {
            from -= b.len();
            continue;
        }
        let part = &b[from..];
        from = 0;
        let k = part.len().min(slot.len() - n);
        slot[n..n + k].copy_from_slice(&part[..k]);
        n += k;
        if n == slot.len() {
            break;
        }
    }
    n
}

/// `rclose`: FIN and the last sends delivered (bounded), then the connection and its id go.
pub fn close(fd: c_int) -> Result<(), Fail> {
    let rs = lock(&SOCKETS)
        .as_mut()
        .and_then(|m| m.remove(&fd))
        .ok_or_else(|| Fail::new(libc::EBADF, "not an rsocket"))?;
    let mut s = rs.inner();
    if s.state == State::Connected && s.error.is_none() && !s.peer_gone {
        s.shut_wr = true;
        let deadline = Instant::now() + CLOSE_WAIT;
        loop {
            drain(&mut s);
            let done = s.flow.fin_sent() && s.flow.sends_in_flight() == 0;
            if done || s.error.is_some() || s.peer_gone || Instant::now() >= deadline {
                break;
            }
            s = match rs.block(s, Some(deadline)) {
                Ok(s) => s,
                Err(_) => rs.inner(),
            };
        }
    }
    let id_ptr = s.id;
    if s.state == State::Listening {
        // Requests never accepted are refused with their listener.
        let pending = with_news(id_ptr, |n| std::mem::take(&mut n.requests));
        for (child, _) in pending {
            if let Ok(c) = id_of(child) {
                let _ = c.reject(Vec::new());
            }
            let _ = Id::destroy(child as *mut Id);
            forget_news(child);
        }
    }
    if let Ok(id) = id_of(id_ptr) {
        if matches!(s.state, State::Connected | State::Connecting) {
            let _ = id.disconnect();
        }
        if let Some(conn) = s.conn.take() {
            conn.destroy(Some(id));
        }
        let _ = Id::destroy(id_ptr as *mut Id);
    }
    for map in s.own.drain_all() {
        Conn::deregister(map.mr);
    }
    forget_news(id_ptr);
    Ok(())
}

/// The rsocket numbered `fd` for rpoll; None for any other descriptor (polled as it is).
pub fn rsocket_of(fd: c_int) -> Option<Arc<RSocket>> {
    if fd < 0 {
        return None;
    }
    lookup(fd)
}

/// rpoll: `fds` as (fd, events) in, revents out.
pub fn rpoll(fds: &mut [(c_int, i16, i16)], timeout: Option<Duration>) -> Result<usize, Fail> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let sockets: Vec<Option<Arc<RSocket>>> = fds.iter().map(|f| rsocket_of(f.0)).collect();
    loop {
        // Readiness now.
        let mut ready = 0usize;
        let mut plain: Vec<(usize, libc::pollfd)> = Vec::new();
        for (i, f) in fds.iter_mut().enumerate() {
            f.2 = 0;
            match &sockets[i] {
                Some(rs) => f.2 = rs.poll_events(f.1),
                None if f.0 >= 0 => plain.push((
                    i,
                    libc::pollfd {
                        fd: f.0,
                        events: f.1,
                        revents: 0,
                    },
                )),
                None => {}
            }
        }
        if !plain.is_empty() {
            let mut p: Vec<libc::pollfd> = plain.iter().map(|x| x.1).collect();
            sys_poll(&mut p, 0)?;
            for (k, (i, _)) in plain.iter().enumerate() {
                fds[*i].2 = p[k].revents;
            }
        }
        for f in fds.iter() {
            if f.2 != 0 {
                ready += 1;
            }
        }
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if ready > 0 || left.is_some_and(|l| l.is_zero()) {
            return Ok(ready);
        }
        // Sleep on the plain descriptors and every rsocket's wake-up descriptors.
        let mut all: Vec<libc::pollfd> = plain.iter().map(|x| x.1).collect();
        let mut owners: Vec<Option<Arc<RSocket>>> = vec![None; all.len()];
        let mut again = false;
        let mut seen: Vec<RawFd> = Vec::new();
        for rs in sockets.iter().flatten() {
            if seen.contains(&rs.number.as_raw_fd()) {
                continue;
            }
            seen.push(rs.number.as_raw_fd());
            match rs.wake_fds() {
                None => again = true,
                Some(w) => {
                    for fd in w {
                        all.push(libc::pollfd {
                            fd,
                            events: libc::POLLIN,
                            revents: 0,
                        });
                        owners.push(Some(rs.clone()));
                    }
                }
            }
        }
        if again {
            continue;
        }
        let ms = match left {
            None => -1,
            Some(l) => c_int::try_from(l.as_millis().max(1)).unwrap_or(c_int::MAX),
        };
        sys_poll(&mut all, ms)?;
        for (k, p) in all.iter().enumerate() {
            if p.revents != 0 {
                if let Some(rs) = &owners[k] {
                    rs.woken(p.fd);
                }
            }
        }
    }
}

fn sys_poll(p: &mut [libc::pollfd], ms: c_int) -> Result<(), Fail> {
    // SAFETY: a live array of pollfds of its length.
    let rc = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return Err(Fail::new(
            e.raw_os_error().unwrap_or(libc::EIO),
            "poll failed",
        ));
    }
    Ok(())
}
