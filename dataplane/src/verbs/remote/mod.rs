//! The verbs transport between engines: RDMA between containers on different hosts, and
//! between containers served by different shards of one router.
//!
//! Each shard's engine owns one. Shard 0's listens on the verbs port of this host's address
//! (the peer port + 1) and accepts only the registered hosts' routers; a connection whose hello
//! names a container another shard serves is handed to that shard ([`Transport::take_handoff`],
//! [`Transport::adopt_incoming`]), whose answer to the hello names that shard and the
//! router's number of shards. A requester keeps one connection per (other host, destination
//! shard) that its QPs send to: requests leave on it, the responses come back on it. Between the shards of one router the same frames travel on Unix socket pairs made at
//! start, one per ordered pair of shards ([`Link::Shard`]): the requester's and responder's
//! code is the one used between hosts, so every operation, error, retry and the flow control
//! work across shards as across hosts. Every socket is non-blocking; the shard's io_uring
//! watches them (one-shot polls armed by [`Transport::watch`], results handed back with
//! [`Transport::ready`]) so an idle transport costs no system call per pass. The frames are
//! `freeflow_proto::verbs::remote`'s.
//!
//! This module holds the sockets, the cluster's table (which overlay address lives on which
//! host and whose it is) and the per-QP state ([`RemoteQp`]); executing requests and
//! completing them on responses is the engine's (`exec::remote`, `exec::respond`).

mod conn;
#[cfg(test)]
mod tests;

pub(crate) use conn::{Conn, ConnState, Next, Stream};

use crate::verbs::send_op::SendOp;
use freeflow_proto::control::NetworkView;
use freeflow_proto::verbs::remote::VERBS_PORT_OFFSET;
use freeflow_proto::verbs::work::SendWqe;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
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
/// Connections from one host's address that are kept (beyond, the oldest goes, and the QPs
/// on it fail): a router opens one per (its shard, our shard) that its QPs send to, and
/// before the first answer to a hello tells it our number of shards, one per destination
/// container its shards start sending to at once. A bound, not a budget: a registered peer
/// that opens this many holds as many of the router's descriptors.
const INCOMING_PER_HOST: usize = 256;
/// Requests of one QP in flight at most.
pub(crate) const QP_INFLIGHT_MAX: usize = 256;
/// Poll events (`POLLIN`, `POLLOUT`) for the shard's io_uring.
const POLL_IN: u32 = libc::POLLIN as u32;
const POLL_OUT: u32 = libc::POLLOUT as u32;

/// The other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Link {
    /// The router of another host, at this address.
    Host(Ipv4Addr),
    /// Another shard of this router.
    Shard(u16),
}

/// The shard of a router with `shards` shards that serves the verbs contexts of the container
/// at `ip`: every context of a container goes to one shard, and any shard (and the control
/// thread, which hands attachments over) finds it from the address alone, with no shared
/// table.
pub fn shard_of(ip: Ipv4Addr, shards: usize) -> usize {
    u32::from(ip) as usize % shards.max(1)
}

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
    /// The connection it went on (its token): a request of a connection that broke is lost.
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
    /// Responder: the last sequence number acknowledged by riding on a request of this QP
    /// (on the other connection): a retry NAK on the response connection is preceded by a
    /// plain ACK of it, so that the NAK never overtakes it.
    pub(crate) acked_ahead: Option<u32>,
}

/// Payloads of at least this many bytes go straight from registered memory (the requester's
/// SEND and WRITE, the responder's READ data): no copy into the send buffer. Smaller ones are
/// copied: their frames then leave in one contiguous buffer, while each zero-copy payload
/// costs two more pieces of a gathered send and the reference count of its mapping. Measured
/// on this VM (header + payload, 16 frames per system call over a Unix socket pair, copy and
/// `write` against `sendmsg` with an iovec per piece): 64 B 2.2x slower with iovecs, 1 KiB
/// 1.5x, 4 KiB even, 16 KiB 0.83x, 64 KiB 0.81x; so the iovec pays from 16 KiB on with a
/// margin above the break-even (docs/verbs-engine.md, "Across hosts").
pub(crate) const ZERO_COPY_MIN: u64 = 16 * 1024;

/// How long a responder holds an ACK for a request of its own QP's to ride on (the reply):
/// past it, the ACK goes alone. The reply usually follows within tens of microseconds (the
/// program sees the receive and posts); a one-way stream waits at most this for its
/// acknowledgements, which cover every request before them.
pub(crate) const ACK_HOLD: Duration = Duration::from_micros(100);

/// An acknowledgement the responder holds back (see [`ACK_HOLD`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeldAck {
    /// The responder's QP (whose requests to the requester may carry it).
    pub(crate) qp: crate::verbs::ids::QpId,
    /// The token of the incoming connection the requests came on (where it goes alone).
    pub(crate) conn: u64,
    /// The ACK frame (its sequence number moves up as later requests execute).
    pub(crate) ack: freeflow_proto::verbs::remote::FrameHeader,
    /// When it goes alone.
    pub(crate) due: Instant,
}

/// What [`Transport::out_conn`] found.
pub(crate) enum OutConn<'a> {
    Up(&'a mut Conn),
    /// Connecting: wait for it.
    Connecting,
    /// Not reachable now (retrying later).
    Down,
}

/// A shard's ends of the two socket pairs between it and another shard (one each way, as a
/// connection carries requests one way and their responses the other).
#[derive(Debug)]
pub struct SiblingLink {
    /// The other shard.
    pub shard: usize,
    /// Our requests to it, its responses back.
    pub out: UnixStream,
    /// Its requests to us, our responses back.
    pub incoming: UnixStream,
}

impl SiblingLink {
    /// The links of every shard of a router with `shards` shards: element `i` is shard `i`'s.
    pub fn mesh(shards: usize) -> std::io::Result<Vec<Vec<SiblingLink>>> {
        let mut links: Vec<Vec<SiblingLink>> = (0..shards).map(|_| Vec::new()).collect();
        for a in 0..shards {
            for b in a + 1..shards {
                let (a_out, b_in) = UnixStream::pair()?;
                let (b_out, a_in) = UnixStream::pair()?;
                for s in [&a_out, &b_in, &b_out, &a_in] {
                    s.set_nonblocking(true)?;
                }
                links[a].push(SiblingLink {
                    shard: b,
                    out: a_out,
                    incoming: a_in,
                });
                links[b].push(SiblingLink {
                    shard: a,
                    out: b_out,
                    incoming: b_in,
                });
            }
        }
        Ok(links)
    }
}

/// Whose requests a connection of ours to another host carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum OutDest {
    /// Between shards of this router: every request to that shard.
    Any,
    /// To another host whose number of shards we did not know when it was opened: the
    /// requests to this container (until the answer to its hello moves it to its shard's key,
    /// unless another connection holds that already).
    Container(Ipv4Addr),
    /// The requests to every container this shard of the other host serves.
    Shard(u16),
}

/// The key of a connection of ours: where it leads and whose requests it carries.
pub(crate) type OutKey = (Link, OutDest);

/// The sockets of the transport and the table of the cluster.
#[derive(Debug, Default)]
pub struct Transport {
    /// This shard's index and the router's number of shards.
    shard: usize,
    shards: usize,
    /// This host's registered containers: overlay address to tenant.
    local: HashMap<Ipv4Addr, String>,
    host_ip: Option<Ipv4Addr>,
    port: u16,
    /// Other hosts' routers and their verbs ports.
    peers: HashMap<Ipv4Addr, u16>,
    /// Other hosts' routers' numbers of shards, as the last answer to a hello said.
    peer_shards: HashMap<Ipv4Addr, u16>,
    overlay: HashMap<Ipv4Addr, Placement>,
    listener: Option<(TcpListener, u64)>,
    listener_armed: bool,
    listener_ready: bool,
    /// Ours: requests out, responses in.
    pub(crate) out: HashMap<OutKey, Conn>,
    /// When a connect to a host may be tried again.
    retry_at: HashMap<OutKey, Instant>,
    /// Theirs: requests in, responses out.
    pub(crate) incoming: Vec<Conn>,
    /// Accepted connections whose hello names a container of another shard, with that shard.
    handoff: Vec<(usize, Conn)>,
    /// Sockets closed whose polls the shard must cancel before they are dropped.
    closing: Vec<(u64, OwnedFd)>,
    next_token: u64,
}

impl Transport {
    /// Whether there is anything to carry: the daemon described a cluster, or the router has
    /// other shards.
    pub(crate) fn active(&self) -> bool {
        self.host_ip.is_some() || self.shards > 1
    }

    /// This transport is shard `shard`'s of `shards`; `links` are its ends of the socket
    /// pairs with every other shard: (that shard, our requests to it, its requests to us).
    pub fn set_shard(&mut self, shard: usize, shards: usize, links: Vec<SiblingLink>) {
        self.shard = shard;
        self.shards = shards;
        for SiblingLink {
            shard: other,
            out,
            incoming,
        } in links
        {
            let link = Link::Shard(other as u16);
            let token = self.token();
            let conn = Conn::new(Stream::Local(out), link, token, ConnState::Up);
            self.out.insert((link, OutDest::Any), conn);
            let token = self.token();
            let conn = Conn::new(Stream::Local(incoming), link, token, ConnState::Up);
            self.incoming.push(conn);
        }
    }

    /// Takes this host's registered containers (overlay address, tenant).
    pub fn set_local(&mut self, containers: impl IntoIterator<Item = (Ipv4Addr, String)>) {
        self.local = containers.into_iter().collect();
    }

    /// Whether `ip` is a registered container of this host whose verbs contexts another shard
    /// serves, and which.
    fn sibling_of(&self, ip: Ipv4Addr, tenant: &str) -> Option<usize> {
        let shard = shard_of(ip, self.shards);
        (self.shards > 1 && shard != self.shard && self.local.get(&ip).is_some_and(|t| t == tenant))
            .then_some(shard)
    }

    /// Where a QP of tenant `tenant` reaches overlay address `ip`: another shard of this
    /// router serving that container of the tenant, or another registered host whose
    /// container of the tenant it is.
    pub(crate) fn link_of(&self, ip: Ipv4Addr, tenant: &str) -> Option<Link> {
        if let Some(shard) = self.sibling_of(ip, tenant) {
            return Some(Link::Shard(shard as u16));
        }
        self.host_of(ip, tenant).map(Link::Host)
    }

    /// The tenant of the container at `src_ip` if it is one that the other end of a
    /// connection from `from` may speak for: a container of that host, or of this host served
    /// by that shard.
    pub(crate) fn source_tenant(&self, src_ip: Ipv4Addr, from: Link) -> Option<&str> {
        match from {
            Link::Host(host) => self
                .overlay
                .get(&src_ip)
                .filter(|p| p.host == host)
                .map(|p| p.tenant.as_str()),
            Link::Shard(shard) => self
                .local
                .get(&src_ip)
                .filter(|_| shard_of(src_ip, self.shards) == usize::from(shard))
                .map(String::as_str),
        }
    }

    /// Whether this shard talks to other hosts' routers (a connection, or one to accept).
    pub(crate) fn reaches_hosts(&self) -> bool {
        self.listener_ready
            || self.out.keys().any(|(l, _)| matches!(l, Link::Host(_)))
            || self
                .incoming
                .iter()
                .any(|c| matches!(c.link, Link::Host(_)))
    }

    /// Accepted connections that another shard serves (the shard hands them over).
    pub(crate) fn take_handoff(&mut self) -> Vec<(usize, Conn)> {
        std::mem::take(&mut self.handoff)
    }

    /// A connection another shard accepted for a container this one serves.
    pub(crate) fn adopt_incoming(&mut self, mut conn: Conn) {
        conn.token = self.token();
        conn.in_armed = false;
        conn.out_armed = false;
        conn.readable = true;
        self.incoming.push(conn);
    }

    fn token(&mut self) -> u64 {
        self.next_token += 2;
        self.next_token
    }

    /// Follows a new view of the cluster: listens on this host's verbs port (again if it
    /// moved; shard 0 only) and forgets hosts that left (their connections close).
    pub fn set_network(&mut self, network: &NetworkView) {
        let port = network.peer_port.wrapping_add(VERBS_PORT_OFFSET);
        let moved = self.host_ip != Some(network.host_ip) || self.port != port;
        if self.shard != 0 {
            self.host_ip = Some(network.host_ip);
            self.port = port;
        } else if moved || self.listener.is_none() {
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
        let gone: Vec<OutKey> = self
            .out
            .keys()
            .filter(|(l, _)| matches!(l, Link::Host(h) if !self.peers.contains_key(h)))
            .copied()
            .collect();
        for key in gone {
            self.close_out(key, "its host left the cluster");
        }
        let peers = &self.peers;
        let (keep, drop): (Vec<Conn>, Vec<Conn>) = std::mem::take(&mut self.incoming)
            .into_iter()
            .partition(|c| match c.link {
                Link::Host(h) => peers.contains_key(&h),
                Link::Shard(_) => true,
            });
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

    /// The key of our connection over `link` for requests to the container at `dst`: the
    /// one opened for that container while the host's number of shards was unknown, else the
    /// one of the shard serving it there (once known).
    pub(crate) fn out_key(&self, link: Link, dst: Ipv4Addr) -> OutKey {
        let Link::Host(host) = link else {
            return (link, OutDest::Any);
        };
        let own = (link, OutDest::Container(dst));
        if self.out.contains_key(&own) {
            return own;
        }
        match self.peer_shards.get(&host) {
            Some(&shards) => {
                let shard = shard_of(dst, usize::from(shards)) as u16;
                (link, OutDest::Shard(shard))
            }
            None => own,
        }
    }

    /// Our connection over `link` for requests to the container at `dst`, connecting first if
    /// there is none.
    pub(crate) fn out_conn(&mut self, link: Link, dst: Ipv4Addr, now: Instant) -> OutConn<'_> {
        let key = self.out_key(link, dst);
        if !self.out.contains_key(&key) {
            let Link::Host(host) = link else {
                return OutConn::Down; // the shard's link broke: it is not made again
            };
            if self.retry_at.get(&key).is_some_and(|t| now < *t) {
                return OutConn::Down;
            }
            if let Err(e) = self.connect(key, host, dst, now) {
                log::warn!(
                    target: &format!("verbs connect {host}"),
                    "verbs: cannot reach the router of {host}: {e}"
                );
                self.retry_at.insert(key, now + CONNECT_RETRY);
                return OutConn::Down;
            }
        }
        match self.out.get_mut(&key) {
            Some(c) if c.state == ConnState::Up => OutConn::Up(c),
            Some(_) => OutConn::Connecting,
            None => OutConn::Down,
        }
    }

    /// The token of our connection over `link` to `dst` that is up, if one is, and when it
    /// last heard from the other end.
    pub(crate) fn out_token(&self, link: Link, dst: Ipv4Addr) -> Option<(u64, Instant)> {
        self.out
            .get(&self.out_key(link, dst))
            .filter(|c| c.state == ConnState::Up)
            .map(|c| (c.token, c.last_heard))
    }

    fn connect(
        &mut self,
        key: OutKey,
        host: Ipv4Addr,
        dst: Ipv4Addr,
        now: Instant,
    ) -> io::Result<()> {
        let (Some(port), Some(me)) = (self.peers.get(&host).copied(), self.host_ip) else {
            return Err(io::ErrorKind::NotFound.into());
        };
        let socket = crate::sys::tcp_socket(false)?;
        crate::sys::connect_nonblocking(&socket, host, port, false)?;
        let stream = TcpStream::from(socket);
        let _ = stream.set_nodelay(true);
        let token = self.token();
        let mut conn = Conn::new(
            Stream::Tcp(stream),
            Link::Host(host),
            token,
            ConnState::Connecting(now + CONNECT_TIMEOUT),
        );
        conn.readable = false;
        conn.writable = true;
        conn.push_hello(me, dst);
        self.out.insert(key, conn);
        Ok(())
    }

    /// Closes our connection `key` (its requests in flight are lost: the engine fails them
    /// when it sees the connection's token gone).
    pub(crate) fn close_out(&mut self, key: OutKey, why: &str) {
        if let Some(c) = self.out.remove(&key) {
            log::warn!("verbs: connection to {} closed: {why}", describe(key.0));
            self.retry_at.insert(key, Instant::now() + CONNECT_RETRY);
            self.bury(c);
        }
    }

    /// The incoming connection whose token is `token`.
    pub(crate) fn incoming_by_token(&mut self, token: u64) -> Option<&mut Conn> {
        self.incoming.iter_mut().find(|c| c.token == token)
    }

    /// Closes incoming connection `index` (a garbage or broken stream: that connection only).
    pub(crate) fn close_incoming(&mut self, index: usize, why: &str) {
        if index < self.incoming.len() {
            let c = self.incoming.swap_remove(index);
            log::warn!(
                "verbs: dropped the connection from {}: {why}",
                describe(c.link)
            );
            self.bury(c);
        }
    }

    fn bury(&mut self, c: Conn) {
        c.stream.shutdown();
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
        let pending = |c: &Conn| {
            c.readable
                || matches!(
                    c.state,
                    ConnState::Connecting(_) | ConnState::AwaitAnswer(_)
                )
        };
        let mut answered = Vec::new();
        let keys: Vec<OutKey> = match self.out.values().any(pending) {
            true => self.out.keys().copied().collect(),
            false => Vec::new(),
        };
        for key in keys {
            let Some(c) = self.out.get_mut(&key) else {
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
                        self.close_out(key, &format!("connect failed: {e}"));
                        continue;
                    }
                }
            }
            if c.readable {
                if let Err(e) = c.fill() {
                    self.close_out(key, &e.to_string());
                    continue;
                }
                work += 1;
            }
            if let ConnState::AwaitAnswer(deadline) = c.state {
                match c.take_answer() {
                    Ok(Some(answer)) => answered.push((key, answer)),
                    Ok(None) if now >= deadline => self.close_out(key, "no answer to the hello"),
                    Ok(None) => {}
                    Err(e) => self.close_out(key, &format!("bad answer to the hello: {e}")),
                }
            }
        }
        for (key, answer) in answered {
            self.answered(key, answer);
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
                match c.take_hello() {
                    Err(e) => {
                        self.close_incoming(i, &format!("bad hello: {e}"));
                        continue;
                    }
                    Ok(false) => {}
                    Ok(true) => {
                        // The shard serving the destination serves the connection: the answer
                        // says which, and how many shards this router has.
                        let shards = self.shards.max(1);
                        let shard = shard_of(c.dst, shards);
                        c.push_answer(shard as u16, shards as u16);
                        // No poll of it is armed now (the one that read the hello fired): it
                        // can move to that shard, with what it buffered.
                        if !c.in_armed && !c.out_armed && shard != self.shard {
                            let c = self.incoming.swap_remove(i);
                            self.handoff.push((shard, c));
                            continue;
                        }
                    }
                }
            }
            i += 1;
        }
        work
    }

    /// Our connection `key` is up, served by the other host's shard `answer.shard` of
    /// `answer.shards`: it moves to that shard's key, where the requests to every container
    /// of that shard find it, unless another connection holds the key (then it stays, or goes
    /// to its container's key, and carries that container's requests).
    fn answered(&mut self, key: OutKey, answer: freeflow_proto::verbs::remote::HelloAnswer) {
        let Link::Host(host) = key.0 else {
            return;
        };
        self.peer_shards.insert(host, answer.shards);
        let target = (key.0, OutDest::Shard(answer.shard));
        if key == target {
            return;
        }
        let Some(conn) = self.out.remove(&key) else {
            return;
        };
        let to = if self.out.contains_key(&target) {
            (key.0, OutDest::Container(conn.dst))
        } else {
            target
        };
        self.out.insert(to, conn);
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
                    let from = Link::Host(*addr.ip());
                    let same: Vec<usize> = (0..self.incoming.len())
                        .filter(|&i| self.incoming[i].link == from)
                        .collect();
                    if same.len() >= INCOMING_PER_HOST {
                        self.close_incoming(same[0], "a newer connection from that host came");
                    }
                    let token = self.token();
                    let stream = Stream::Tcp(stream);
                    self.incoming
                        .push(Conn::new(stream, from, token, ConnState::AwaitHello));
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
        let broken: Vec<(OutKey, String)> = self
            .out
            .iter_mut()
            .filter(|(_, c)| {
                matches!(c.state, ConnState::Up | ConnState::AwaitAnswer(_)) && c.tx_pending() > 0
            })
            .filter_map(|(key, c)| c.flush().err().map(|e| (*key, e.to_string())))
            .collect();
        for (key, why) in broken {
            self.close_out(key, &why);
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
                ConnState::Connecting(d) | ConnState::AwaitAnswer(d) => Some(d),
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

#[cfg(test)]
impl Transport {
    /// Tests only, in place of the shard's io_uring: marks each connection as the kernel
    /// reports it now (poll(2) without waiting): readable, hung up, writable.
    pub(crate) fn poll_now(&mut self) {
        use std::os::fd::AsFd;
        let ready = libc::POLLIN | libc::POLLHUP | libc::POLLERR;
        if let Some((l, _)) = &self.listener {
            let mut p = [freeflow_os::poll::PollFd::new(l.as_fd(), libc::POLLIN)];
            if freeflow_os::poll::poll(&mut p, Some(Duration::ZERO)).is_ok_and(|n| n > 0) {
                self.listener_ready = true;
            }
        }
        for c in self.out.values_mut().chain(self.incoming.iter_mut()) {
            let events = libc::POLLIN | libc::POLLOUT;
            let mut p = [freeflow_os::poll::PollFd::new(c.stream.as_fd(), events)];
            if freeflow_os::poll::poll(&mut p, Some(Duration::ZERO)).is_ok_and(|n| n > 0) {
                c.readable |= p[0].revents() & ready != 0;
                c.writable |= p[0].revents() & libc::POLLOUT != 0;
            }
        }
    }
}

/// Whether our connect finished (Ok(true): up now), failed (Err) or goes on (Ok(false)).
fn finish_connect(c: &mut Conn, now: Instant, deadline: Instant) -> io::Result<bool> {
    if let Some(e) = c.stream.take_error()? {
        return Err(e);
    }
    if c.stream.connected() {
        // Up once the answer to the hello comes (no request goes before it).
        c.state = ConnState::AwaitAnswer(now + CONNECT_TIMEOUT);
        c.readable = true;
        return Ok(true);
    }
    if now >= deadline {
        return Err(io::ErrorKind::TimedOut.into());
    }
    Ok(false)
}

/// The other end of a connection, for the log.
fn describe(link: Link) -> String {
    match link {
        Link::Host(host) => format!("the router of {host}"),
        Link::Shard(shard) => format!("shard {shard}"),
    }
}
