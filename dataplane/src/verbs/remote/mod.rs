//! The router-to-router verbs transport: RDMA between containers on different hosts.
//!
//! The engine's shard owns it. It listens on the verbs port of this host's address (the peer
//! port + 1), accepts only the registered hosts' routers, and keeps one connection to each
//! other host that a QP of this router sends to: requests leave on it, the responses come
//! back on it. Every socket is non-blocking; the shard's io_uring watches them (one-shot polls
//! armed by [`Transport::watch`], results handed back with [`Transport::ready`]) so an idle
//! transport costs no system call per pass. The frames are `freeflow_proto::verbs::remote`'s.
//!
//! This module holds the sockets, the cluster's table (which overlay address lives on which
//! host and whose it is) and the per-QP state ([`RemoteQp`]); executing requests and
//! completing them on responses is the engine's (`exec::remote`, `exec::respond`).

mod conn;
#[cfg(test)]
mod tests;

pub(crate) use conn::{Conn, ConnState, Next};

use crate::verbs::send_op::SendOp;
use freeflow_proto::control::NetworkView;
use freeflow_proto::verbs::remote::VERBS_PORT_OFFSET;
use freeflow_proto::verbs::work::SendWqe;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// How long a connect to another router may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The wait after a failed connect before the next attempt.
const CONNECT_RETRY: Duration = Duration::from_millis(50);
/// Bytes of one QP's requests in flight (beyond, its next request waits for acknowledgements;
/// a single larger message goes alone).
pub(crate) const QP_INFLIGHT_BYTES: u64 = 1 << 20;
/// The shortest silence of a connection, with requests in flight, that fails them: a router
/// that shares its core with spinning programs can be off the CPU for a while, and TCP already
/// retransmits what was lost (a router that died resets the connection at once).
pub(crate) const SILENCE_FLOOR: Duration = Duration::from_secs(2);
/// Connections from one host's address that are kept (beyond, the oldest goes): a router
/// needs one.
const INCOMING_PER_HOST: usize = 4;
/// Requests of one QP in flight at most.
pub(crate) const QP_INFLIGHT_MAX: usize = 256;
/// Poll events (`POLLIN`, `POLLOUT`) for the shard's io_uring.
const POLL_IN: u32 = libc::POLLIN as u32;
const POLL_OUT: u32 = libc::POLLOUT as u32;

/// Where a registered overlay address lives, and whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Placement {
    pub(crate) tenant: String,
    pub(crate) host: Ipv4Addr,
}

/// A request of a QP sent and not yet answered.
#[derive(Debug)]
pub(crate) struct InFlight {
    pub(crate) wqe: SendWqe,
    pub(crate) op: SendOp,
    pub(crate) seq: u32,
    /// The router's copy of the WQE's slot (scatter/gather list, inline data).
    pub(crate) slot: Vec<u8>,
    /// Payload bytes it stands for (what [`QP_INFLIGHT_BYTES`] counts).
    pub(crate) bytes: u64,
    /// Whether its success completes in the send CQ.
    pub(crate) signaled: bool,
    pub(crate) sent_at: Instant,
    /// The connection it went on: a request of a connection that broke is lost.
    pub(crate) conn: u64,
}

/// The requests of a QP that the responder refused for now, to be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resend {
    pub(crate) at: Instant,
}

/// The transport's state of a QP whose destination is on another host.
#[derive(Debug, Default)]
pub(crate) struct RemoteQp {
    /// Requester: the sequence number of the next request (from `sq_psn`).
    pub(crate) next_seq: u32,
    /// Responder: the sequence number of the next request to execute (from `rq_psn`).
    pub(crate) expected: u32,
    pub(crate) inflight: VecDeque<InFlight>,
    pub(crate) inflight_bytes: u64,
    /// READs and atomics in flight (bounded by `max_rd_atomic`).
    pub(crate) reads: u32,
    /// Requests in flight whose success completes in the send CQ (signaled ones): the CQ must
    /// have room for them before the QP takes another WQE.
    pub(crate) signaled: u32,
    pub(crate) resend: Option<Resend>,
    /// RNR and transport retries left since the last progress (None: not counting).
    pub(crate) rnr_left: Option<u8>,
    pub(crate) retry_left: Option<u8>,
    /// Slot copies to reuse (no allocation per request once warm).
    pub(crate) spare: Vec<Vec<u8>>,
}

/// What [`Transport::out_conn`] found.
pub(crate) enum OutConn<'a> {
    Up(&'a mut Conn),
    /// Connecting: wait for it.
    Connecting,
    /// Not reachable now (retrying later).
    Down,
}

/// The sockets of the transport and the table of the cluster.
#[derive(Debug, Default)]
pub struct Transport {
    host_ip: Option<Ipv4Addr>,
    port: u16,
    /// Other hosts' routers and their verbs ports.
    peers: HashMap<Ipv4Addr, u16>,
    overlay: HashMap<Ipv4Addr, Placement>,
    listener: Option<(TcpListener, u64)>,
    listener_armed: bool,
    listener_ready: bool,
    /// Ours: requests out, responses in.
    pub(crate) out: HashMap<Ipv4Addr, Conn>,
    /// When a connect to a host may be tried again.
    retry_at: HashMap<Ipv4Addr, Instant>,
    /// Theirs: requests in, responses out.
    pub(crate) incoming: Vec<Conn>,
    /// Sockets closed whose polls the shard must cancel before they are dropped.
    closing: Vec<(u64, OwnedFd)>,
    next_token: u64,
}

impl Transport {
    /// Whether the daemon described a cluster (a router used alone has no transport).
    pub(crate) fn active(&self) -> bool {
        self.host_ip.is_some()
    }

    fn token(&mut self) -> u64 {
        self.next_token += 2;
        self.next_token
    }

    /// Follows a new view of the cluster: listens on this host's verbs port (again if it
    /// moved) and forgets hosts that left (their connections close).
    pub fn set_network(&mut self, network: &NetworkView) {
        let port = network.peer_port.wrapping_add(VERBS_PORT_OFFSET);
        if self.host_ip != Some(network.host_ip) || self.port != port || self.listener.is_none() {
            self.host_ip = Some(network.host_ip);
            self.port = port;
            if let Some((l, token)) = self.listener.take() {
                self.closing.push((token, OwnedFd::from(l)));
            }
            let addr = SocketAddr::V4(SocketAddrV4::new(network.host_ip, port));
            match TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|_| l)) {
                Ok(l) => {
                    let token = self.token();
                    self.listener = Some((l, token));
                    self.listener_armed = false;
                    self.listener_ready = true;
                }
                Err(e) => log::warn!("verbs: cannot listen for peer routers on {addr}: {e}"),
            }
        }
        self.peers = network
            .hosts
            .iter()
            .filter(|h| h.host_ip != network.host_ip)
            .map(|h| (h.host_ip, h.peer_port.wrapping_add(VERBS_PORT_OFFSET)))
            .collect();
        self.overlay = network
            .overlay
            .iter()
            .map(|e| {
                let p = Placement {
                    tenant: e.tenant.clone(),
                    host: e.host_ip,
                };
                (e.ip, p)
            })
            .collect();
        let gone: Vec<Ipv4Addr> = self
            .out
            .keys()
            .filter(|h| !self.peers.contains_key(h))
            .copied()
            .collect();
        for host in gone {
            self.close_out(host, "its host left the cluster");
        }
        let peers = &self.peers;
        let (keep, drop): (Vec<Conn>, Vec<Conn>) = std::mem::take(&mut self.incoming)
            .into_iter()
            .partition(|c| peers.contains_key(&c.host));
        self.incoming = keep;
        for c in drop {
            self.bury(c);
        }
    }

    /// The host a QP of tenant `tenant` reaches overlay address `ip` on: another registered
    /// host whose container of that tenant it is.
    pub(crate) fn host_of(&self, ip: Ipv4Addr, tenant: &str) -> Option<Ipv4Addr> {
        let p = self.overlay.get(&ip)?;
        (p.tenant == tenant && Some(p.host) != self.host_ip && self.peers.contains_key(&p.host))
            .then_some(p.host)
    }

    pub(crate) fn placement(&self, ip: Ipv4Addr) -> Option<&Placement> {
        self.overlay.get(&ip)
    }

    /// Our connection to `host`'s router, connecting first if there is none.
    pub(crate) fn out_conn(&mut self, host: Ipv4Addr, now: Instant) -> OutConn<'_> {
        if !self.out.contains_key(&host) {
            if self.retry_at.get(&host).is_some_and(|t| now < *t) {
                return OutConn::Down;
            }
            if let Err(e) = self.connect(host, now) {
                log::warn!(
                    target: &format!("verbs connect {host}"),
                    "verbs: cannot reach the router of {host}: {e}"
                );
                self.retry_at.insert(host, now + CONNECT_RETRY);
                return OutConn::Down;
            }
        }
        match self.out.get_mut(&host) {
            Some(c) if c.state == ConnState::Up => OutConn::Up(c),
            Some(_) => OutConn::Connecting,
            None => OutConn::Down,
        }
    }

    /// The token of the connection to `host` that is up, if one is, and when it last heard
    /// from the other router.
    pub(crate) fn out_token(&self, host: Ipv4Addr) -> Option<(u64, Instant)> {
        self.out
            .get(&host)
            .filter(|c| c.state == ConnState::Up)
            .map(|c| (c.token, c.last_heard))
    }

    fn connect(&mut self, host: Ipv4Addr, now: Instant) -> io::Result<()> {
        let (Some(port), Some(me)) = (self.peers.get(&host).copied(), self.host_ip) else {
            return Err(io::ErrorKind::NotFound.into());
        };
        let socket = crate::sys::tcp_socket(false)?;
        crate::sys::connect_nonblocking(&socket, host, port, false)?;
        let stream = TcpStream::from(socket);
        let _ = stream.set_nodelay(true);
        let token = self.token();
        let mut conn = Conn::new(
            stream,
            host,
            token,
            ConnState::Connecting(now + CONNECT_TIMEOUT),
        );
        conn.readable = false;
        conn.writable = true;
        conn.push_hello(me);
        self.out.insert(host, conn);
        Ok(())
    }

    /// Closes our connection to `host` (its requests in flight are lost: the engine fails
    /// them when it sees the connection's token gone).
    pub(crate) fn close_out(&mut self, host: Ipv4Addr, why: &str) {
        if let Some(c) = self.out.remove(&host) {
            log::warn!("verbs: connection to the router of {host} closed: {why}");
            self.retry_at.insert(host, Instant::now() + CONNECT_RETRY);
            self.bury(c);
        }
    }

    /// Closes incoming connection `index` (a garbage or broken stream: that connection only).
    pub(crate) fn close_incoming(&mut self, index: usize, why: &str) {
        if index < self.incoming.len() {
            let c = self.incoming.swap_remove(index);
            log::warn!(
                "verbs: dropped the connection from the router of {}: {why}",
                c.host
            );
            self.bury(c);
        }
    }

    fn bury(&mut self, c: Conn) {
        let _ = c.stream.shutdown(std::net::Shutdown::Both);
        self.closing.push((c.token, OwnedFd::from(c.stream)));
    }

    /// Sockets closed since the last call: the shard cancels their polls (both tokens) and
    /// then drops them.
    pub fn take_closing(&mut self) -> Vec<(u64, OwnedFd)> {
        std::mem::take(&mut self.closing)
    }

    /// Accepts waiting routers (registered hosts only), finishes connects, reads what the
    /// sockets have. Returns how much happened.
    pub(crate) fn pump(&mut self, now: Instant) -> usize {
        let mut work = 0;
        if self.listener_ready {
            work += self.accept();
        }
        let pending = |c: &Conn| c.readable || matches!(c.state, ConnState::Connecting(_));
        let hosts: Vec<Ipv4Addr> = match self.out.values().any(pending) {
            true => self.out.keys().copied().collect(),
            false => Vec::new(),
        };
        for host in hosts {
            let Some(c) = self.out.get_mut(&host) else {
                continue;
            };
            if let ConnState::Connecting(deadline) = c.state {
                if !c.writable && now < deadline {
                    continue;
                }
                match finish_connect(c, now, deadline) {
                    Ok(true) => work += 1,
                    Ok(false) => continue,
                    Err(e) => {
                        self.close_out(host, &format!("connect failed: {e}"));
                        continue;
                    }
                }
            }
            if c.readable {
                if let Err(e) = c.fill() {
                    self.close_out(host, &e.to_string());
                }
                work += 1;
            }
        }
        let mut i = 0;
        while i < self.incoming.len() {
            let c = &mut self.incoming[i];
            if c.readable {
                work += 1;
                if let Err(e) = c.fill() {
                    self.close_incoming(i, &e.to_string());
                    continue;
                }
            }
            if c.state == ConnState::AwaitHello {
                if let Err(e) = c.take_hello() {
                    self.close_incoming(i, &format!("bad hello: {e}"));
                    continue;
                }
            }
            i += 1;
        }
        work
    }

    fn accept(&mut self) -> usize {
        let mut n = 0;
        loop {
            let Some((listener, _)) = self.listener.as_ref() else {
                return n;
            };
            match listener.accept() {
                Ok((stream, SocketAddr::V4(addr))) if self.peers.contains_key(addr.ip()) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let from = *addr.ip();
                    let same: Vec<usize> = (0..self.incoming.len())
                        .filter(|&i| self.incoming[i].host == from)
                        .collect();
                    if same.len() >= INCOMING_PER_HOST {
                        self.close_incoming(same[0], "a newer connection from that host came");
                    }
                    let token = self.token();
                    self.incoming
                        .push(Conn::new(stream, *addr.ip(), token, ConnState::AwaitHello));
                    n += 1;
                }
                Ok((_, addr)) => log::warn!(
                    target: &format!("verbs refused {}", addr.ip()),
                    "verbs: refused a connection from {addr}: not a registered host"
                ),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.listener_ready = false;
                    return n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("verbs: accept on the verbs port: {e}");
                    self.listener_ready = false;
                    return n;
                }
            }
        }
    }

    /// Writes what every connection has queued (what the sockets take now).
    pub(crate) fn flush_all(&mut self) {
        if self.out.is_empty() && self.incoming.is_empty() {
            return;
        }
        let broken: Vec<(Ipv4Addr, String)> = self
            .out
            .values_mut()
            .filter(|c| c.state == ConnState::Up && c.tx_pending() > 0)
            .filter_map(|c| c.flush().err().map(|e| (c.host, e.to_string())))
            .collect();
        for (host, why) in broken {
            self.close_out(host, &why);
        }
        let mut i = 0;
        while i < self.incoming.len() {
            let c = &mut self.incoming[i];
            if c.tx_pending() > 0 {
                if let Err(e) = c.flush() {
                    self.close_incoming(i, &e.to_string());
                    continue;
                }
            }
            i += 1;
        }
    }

    /// Whether there is nothing to look at: no connection, no connection waiting to be accepted.
    pub(crate) fn idle(&self) -> bool {
        !self.listener_ready && self.out.is_empty() && self.incoming.is_empty()
    }

    /// Whether a pass would find work without any poll firing: sockets known readable, or
    /// requests read and not executed that the connection has room to answer.
    pub(crate) fn busy(&self) -> bool {
        self.listener_ready
            || self.out.values().any(|c| c.readable)
            || self
                .incoming
                .iter()
                .any(|c| c.readable || (!c.tx_full() && c.has_frame()))
    }

    /// Whether a response waits on one of our connections (for room in a send CQ).
    pub(crate) fn stalled(&self) -> bool {
        self.out.values().any(Conn::has_frame)
    }

    /// The earliest deadline of a connect on its way.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.out
            .values()
            .filter_map(|c| match c.state {
                ConnState::Connecting(d) => Some(d),
                _ => None,
            })
            .min()
    }

    /// Calls `arm(fd, events, token)` for every socket whose poll must be armed (one-shot
    /// polls: each fired one is armed again here).
    pub fn watch(&mut self, mut arm: impl FnMut(RawFd, u32, u64)) {
        if let Some((l, token)) = &self.listener {
            if !self.listener_armed && !self.listener_ready {
                arm(l.as_raw_fd(), POLL_IN, *token);
                self.listener_armed = true;
            }
        }
        for c in self.out.values_mut().chain(self.incoming.iter_mut()) {
            if !c.in_armed && !c.readable && !matches!(c.state, ConnState::Connecting(_)) {
                arm(c.stream.as_raw_fd(), POLL_IN, c.token);
                c.in_armed = true;
            }
            let wants_out = matches!(c.state, ConnState::Connecting(_)) || c.tx_pending() > 0;
            if !c.out_armed && !c.writable && wants_out {
                arm(c.stream.as_raw_fd(), POLL_OUT, c.token | 1);
                c.out_armed = true;
            }
        }
    }

    /// A poll of token `token` completed with `result` (revents, or a negative errno).
    pub fn ready(&mut self, token: u64, result: i32) {
        if self.listener.as_ref().is_some_and(|(_, t)| *t == token) {
            self.listener_armed = false;
            self.listener_ready = true;
            return;
        }
        let base = token & !1;
        let Some(c) = self
            .out
            .values_mut()
            .chain(self.incoming.iter_mut())
            .find(|c| c.token == base)
        else {
            return;
        };
        if token & 1 == 0 {
            c.in_armed = false;
            c.readable |= result != -libc::ECANCELED;
        } else {
            c.out_armed = false;
            c.writable |= result != -libc::ECANCELED;
        }
    }
}

/// Whether our connect finished (Ok(true): up now), failed (Err) or goes on (Ok(false)).
fn finish_connect(c: &mut Conn, now: Instant, deadline: Instant) -> io::Result<bool> {
    if let Some(e) = c.stream.take_error()? {
        return Err(e);
    }
    if c.stream.peer_addr().is_ok() {
        c.state = ConnState::Up;
        c.readable = true;
        return Ok(true);
    }
    if now >= deadline {
        return Err(io::ErrorKind::TimedOut.into());
    }
    Ok(false)
}
