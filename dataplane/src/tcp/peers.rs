//! Connections to peer routers: one outgoing connection to each other host's peer port (we
//! write on it: our listener table, announcements, claims) and the incoming ones (we read
//! what peers say, [`PeerMsg`] lines). Peers are accepted only from registered host addresses;
//! no connect or write ever waits for a peer.

use super::endpoint::{HostEndpoint, OverlayEndpoint};
use super::{Deferred, TcpService};
use crate::sys;
use freeflow_proto::control::NetworkView;
use freeflow_proto::peer::PeerMsg;
use std::collections::HashMap;
use std::io::{self, BufRead, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

/// The first wait before reconnecting to a peer after a failed attempt; it doubles with each
/// further failure, up to [`PEER_RETRY_MAX`]. A peer router that does not know this host yet
/// accepts our connection and closes it at once: without the wait we would reconnect (and
/// both sides log) about once a millisecond.
pub(super) const PEER_RETRY_MIN: Duration = Duration::from_millis(50);
/// The longest wait between attempts, so that a peer back after a long outage (or that has
/// just learned of this host) is reached again within it.
pub(super) const PEER_RETRY_MAX: Duration = Duration::from_secs(5);
/// A connection that stayed up this long was taken by the peer (one that refuses us closes at
/// once): losing it starts over from [`PEER_RETRY_MIN`], with a first attempt at once.
const PEER_STABLE: Duration = Duration::from_secs(1);
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_PEER_LINE: usize = 1 << 20;
/// Bytes kept for a peer while its connection is being made; beyond, they are dropped (the
/// table goes first on every new connection anyway; a lost announcement costs a Resolve).
pub(super) const MAX_PEER_QUEUE: usize = 1 << 20;

struct PeerIn {
    stream: TcpStream,
    from: Ipv4Addr,
    buf: Vec<u8>,
    /// Whether a message came on it yet.
    heard: bool,
}

pub(super) struct PeerOut {
    port: u16,
    pub stream: Option<TcpStream>,
    /// A connection on its way (non-blocking: an unreachable peer must not stall the control
    /// thread), its deadline, and what to send once it is up (our table first).
    pub connecting: Option<(TcpStream, Instant)>,
    pub queue: Vec<u8>,
    next_try: Instant,
    /// The wait after the next failure (see [`PEER_RETRY_MIN`]).
    retry_in: Duration,
    /// When the connection in `stream` came up.
    up_since: Option<Instant>,
}

#[derive(Default)]
pub(super) struct Peers {
    listener: Option<TcpListener>,
    incoming: Vec<PeerIn>,
    pub outgoing: HashMap<Ipv4Addr, PeerOut>,
}

impl Peers {
    /// Follows a new view of the cluster: listens on this host's peer port (again, if it
    /// changed or listening failed before) and keeps one outgoing peer per other host.
    pub fn set_hosts(&mut self, network: &NetworkView, host_changed: bool) {
        if host_changed || self.listener.is_none() {
            let addr = SocketAddr::V4(SocketAddrV4::new(network.host_ip, network.peer_port));
            match TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|_| l)) {
                Ok(l) => self.listener = Some(l),
                Err(e) => {
                    log::warn!("tcp: cannot listen for peer routers on {addr}: {e}")
                }
            }
        }
        let wanted: HashMap<Ipv4Addr, u16> = network
            .hosts
            .iter()
            .map(|h| (h.host_ip, h.peer_port))
            .collect();
        self.outgoing
            .retain(|ip, p| wanted.get(ip) == Some(&p.port));
        for (ip, port) in &wanted {
            self.outgoing.entry(*ip).or_insert(PeerOut {
                port: *port,
                stream: None,
                connecting: None,
                queue: Vec::new(),
                next_try: Instant::now(),
                retry_in: PEER_RETRY_MIN,
                up_since: None,
            });
        }
    }

    /// Whether our connection to `host`'s router is up.
    pub fn is_up(&self, host: Ipv4Addr) -> bool {
        self.outgoing.get(&host).is_some_and(|p| p.stream.is_some())
    }

    /// The descriptors to poll: (listener and incoming, readable), (outgoing, with events).
    fn poll_fds(&self) -> (Vec<BorrowedFd<'_>>, Vec<(BorrowedFd<'_>, i16)>) {
        let mut readable: Vec<BorrowedFd<'_>> = self.listener.iter().map(|l| l.as_fd()).collect();
        readable.extend(self.incoming.iter().map(|p| p.stream.as_fd()));
        // Up connections to peers: writable matters only while bytes wait. Readable means the
        // peer closed or reset (a peer never writes on them). Noticing that at once matters:
        // a write into a dead connection can still succeed locally, and the announcement in it
        // would be lost.
        let mut with_events: Vec<(BorrowedFd<'_>, i16)> = self
            .outgoing
            .values()
            .filter_map(|p| {
                let s = p.stream.as_ref()?;
                let out = if p.queue.is_empty() { 0 } else { libc::POLLOUT };
                Some((s.as_fd(), libc::POLLIN | out))
            })
            .collect();
        // Connections to peers on their way: writable when done.
        with_events.extend(
            self.outgoing
                .values()
                .filter_map(|p| p.connecting.as_ref())
                .map(|(s, _)| (s.as_fd(), libc::POLLOUT)),
        );
        (readable, with_events)
    }

    /// When the next connection attempt is due or times out.
    fn next_deadline(&self) -> Option<Instant> {
        self.outgoing
            .values()
            .filter(|p| p.stream.is_none())
            .map(|p| match &p.connecting {
                Some((_, deadline)) => *deadline,
                None => p.next_try,
            })
            .min()
    }

    /// Accepts the peers waiting: from the hosts of other routers and of registered
    /// containers (`hosts_containers`), never from `host_ip`, this host.
    fn accept(&mut self, host_ip: Option<Ipv4Addr>, hosts_containers: impl Fn(Ipv4Addr) -> bool) {
        let Some(listener) = self.listener.as_ref() else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((stream, SocketAddr::V4(addr))) => {
                    // Never from this host's own address: only the router itself is there, and
                    // containers can bind sockets to it (IP_FREEBIND).
                    let known = (hosts_containers(*addr.ip())
                        || self.outgoing.contains_key(addr.ip()))
                        && Some(*addr.ip()) != host_ip;
                    if !known {
                        // Rate-limited per address (crate::log): a router that does not know
                        // it is refused keeps trying, and must not hide the others.
                        log::warn!(
                            target: &format!("refused peer {}", addr.ip()),
                            "tcp: refused peer connection from {addr}: not a registered host"
                        );
                        continue;
                    }
                    if stream.set_nonblocking(true).is_ok() {
                        self.incoming.push(PeerIn {
                            stream,
                            from: *addr.ip(),
                            buf: Vec::new(),
                            heard: false,
                        });
                    }
                }
                Ok((_, addr)) => {
                    log::warn!("tcp: refused peer connection from {addr}")
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("tcp: accept on peer port: {e}");
                    return;
                }
            }
        }
    }

    /// Gives up the connections on their way whose time is up.
    fn expire_connecting(&mut self, now: Instant) {
        for (host, peer) in self.outgoing.iter_mut() {
            if peer
                .connecting
                .as_ref()
                .is_some_and(|(_, deadline)| now >= *deadline)
            {
                let retry = peer.drop_connection(now, false);
                log::warn!(
                    "tcp: peer router {host} not reachable: timed out; retrying in {retry:?}"
                );
            }
        }
    }

    /// The peers without a connection whose retry is due.
    fn lost(&self, now: Instant) -> Vec<Ipv4Addr> {
        self.outgoing
            .iter()
            .filter(|(_, p)| p.stream.is_none() && p.connecting.is_none() && now >= p.next_try)
            .map(|(h, _)| *h)
            .collect()
    }
}

impl PeerOut {
    /// Drops the connection (up or on its way) and what waits for it, and schedules the next
    /// attempt: at once after a connection that stayed up [`PEER_STABLE`] and ended `cleanly`
    /// (not dropped for not reading), else after a wait that doubles with each failure.
    /// Returns the wait.
    pub(super) fn drop_connection(&mut self, now: Instant, cleanly: bool) -> Duration {
        let lived = self
            .up_since
            .take()
            .is_some_and(|since| now.saturating_duration_since(since) >= PEER_STABLE);
        self.stream = None;
        self.connecting = None;
        self.queue.clear();
        if lived && cleanly {
            self.retry_in = PEER_RETRY_MIN;
            self.next_try = now;
            return Duration::ZERO;
        }
        let wait = self.retry_in;
        self.next_try = now + wait;
        self.retry_in = (wait * 2).min(PEER_RETRY_MAX);
        wait
    }

    /// The peer spoke to us on a new connection of its own: it knows this host, so it takes
    /// our connection too. Retries at once if ours is down (a restarted router is reached
    /// again as soon as it knows us, whatever the wait had grown to).
    pub(super) fn heard_from(&mut self, now: Instant) {
        self.retry_in = PEER_RETRY_MIN;
        if self.stream.is_none() && self.connecting.is_none() {
            self.next_try = now;
        }
    }

    /// When the next connection attempt is due.
    #[cfg(test)]
    pub(super) fn next_try(&self) -> Instant {
        self.next_try
    }

    /// Starts connecting to a peer (without waiting); `first` is sent once connected (a fresh
    /// connection starts with our whole table).
    fn try_connect(&mut self, host: Ipv4Addr, first: Vec<u8>) {
        let now = Instant::now();
        if now < self.next_try || self.stream.is_some() || self.connecting.is_some() {
            return;
        }
        let started = sys::tcp_socket(false).and_then(|socket| {
            let done = sys::connect_nonblocking(&socket, host, self.port, false)?;
            Ok((TcpStream::from(socket), done))
        });
        match started {
            Ok((stream, _)) => {
                self.queue = first;
                self.connecting = Some((stream, now + PEER_CONNECT_TIMEOUT));
            }
            Err(e) => {
                let retry = self.drop_connection(now, false);
                log::warn!("tcp: peer router {host} not reachable: {e}; retrying in {retry:?}");
            }
        }
    }

    /// The connection to a peer finished connecting (it polled writable): up, or failed.
    fn finish_connect(&mut self, host: Ipv4Addr) {
        let Some((stream, _)) = self.connecting.take() else {
            return;
        };
        let queued = std::mem::take(&mut self.queue);
        let up = match stream.take_error() {
            Ok(None) => stream.peer_addr().is_ok(),
            _ => false,
        };
        if !up {
            let retry = self.drop_connection(Instant::now(), false);
            log::warn!("tcp: peer router {host} not reachable; retrying in {retry:?}");
            return;
        }
        // Stays non-blocking: a peer that stops reading must not stall the control thread;
        // what it does not take waits in `queue`.
        let _ = stream.set_nodelay(true);
        self.stream = Some(stream);
        self.up_since = Some(Instant::now());
        self.write_bytes(host, &queued);
    }

    fn write(&mut self, host: Ipv4Addr, msg: &PeerMsg) {
        let line = msg.encode_line();
        if self.stream.is_some() {
            self.write_bytes(host, &line);
        } else if self.connecting.is_some() && self.queue.len() + line.len() <= MAX_PEER_QUEUE {
            self.queue.extend_from_slice(&line);
        }
    }

    /// Writes what the connection takes now and queues the rest behind what already waits.
    /// A peer that lets more than [`MAX_PEER_QUEUE`] pile up is dropped: the connection made
    /// anew starts with our table and claims; announcements lost with it cost Resolves that
    /// time out.
    pub(super) fn write_bytes(&mut self, host: Ipv4Addr, bytes: &[u8]) {
        if self.stream.is_none() {
            return;
        }
        if self.queue.len() + bytes.len() > MAX_PEER_QUEUE {
            let retry = self.drop_connection(Instant::now(), false);
            log::warn!("tcp: peer router {host} does not read; reconnecting in {retry:?}");
            return;
        }
        self.queue.extend_from_slice(bytes);
        self.flush(host);
    }

    /// Writes queued bytes until the connection would block.
    fn flush(&mut self, host: Ipv4Addr) {
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        let mut sent = 0;
        while sent < self.queue.len() {
            match stream.write(&self.queue[sent..]) {
                Ok(0) => break,
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let retry = self.drop_connection(Instant::now(), true);
                    log::warn!("tcp: lost peer router {host}: {e}; reconnecting in {retry:?}");
                    return;
                }
            }
        }
        self.queue.drain(..sent);
    }
}

impl PeerIn {
    /// Reads what is available; false when the peer is gone or misbehaved.
    fn read(&mut self, out: &mut Vec<PeerMsg>) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match io::Read::read(&mut self.stream, &mut chunk) {
                Ok(0) => return false,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
            if self.buf.len() > MAX_PEER_LINE {
                log::warn!(
                    "tcp: peer {} sent an oversized message; dropping it",
                    self.from
                );
                return false;
            }
        }
        let mut cursor = io::Cursor::new(std::mem::take(&mut self.buf));
        let mut line = Vec::new();
        loop {
            line.clear();
            match cursor.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) if line.last() == Some(&b'\n') => match PeerMsg::decode_line(&line) {
                    Ok(msg) => out.push(msg),
                    Err(e) => {
                        log::warn!("tcp: bad message from peer {}: {e}", self.from);
                        return false;
                    }
                },
                Ok(_) => {
                    self.buf = line.clone(); // an incomplete line: keep it for the next read
                    break;
                }
                Err(_) => return false,
            }
        }
        true
    }
}

impl TcpService {
    /// The peer descriptors to poll, and the overlay listeners' (readable: clients that came
    /// without Freeflow).
    pub(super) fn peer_poll_fds(&self) -> Vec<(BorrowedFd<'_>, i16)> {
        let (mut readable, with_events) = self.peers.poll_fds();
        readable.extend(self.relay_poll_fds());
        let mut fds: Vec<(BorrowedFd<'_>, i16)> =
            readable.into_iter().map(|fd| (fd, libc::POLLIN)).collect();
        fds.extend(with_events);
        fds
    }

    pub(super) fn next_peer_deadline(&self) -> Option<Instant> {
        self.peers.next_deadline()
    }

    /// Handles readiness of a peer descriptor; false if `fd` is none of them.
    pub(super) fn on_peer_ready(
        &mut self,
        fd: RawFd,
        revents: i16,
        deferred: &mut Deferred,
    ) -> bool {
        if self
            .peers
            .listener
            .as_ref()
            .is_some_and(|l| l.as_raw_fd() == fd)
        {
            self.accept_peers();
            return true;
        }
        if let Some((&host, peer)) = self.peers.outgoing.iter_mut().find(|(_, p)| {
            p.connecting
                .as_ref()
                .is_some_and(|(s, _)| s.as_raw_fd() == fd)
        }) {
            peer.finish_connect(host);
            return true;
        }
        if let Some((&host, peer)) = self
            .peers
            .outgoing
            .iter_mut()
            .find(|(_, p)| p.stream.as_ref().is_some_and(|s| s.as_raw_fd() == fd))
        {
            if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) == 0 {
                // Only writable: room for what waits.
                peer.flush(host);
                return true;
            }
            let retry = peer.drop_connection(Instant::now(), true);
            log::warn!("tcp: peer router {host} closed our connection; reconnecting in {retry:?}");
            self.listeners.forget_remote(host);
            return true;
        }
        let Some(index) = self
            .peers
            .incoming
            .iter()
            .position(|p| p.stream.as_raw_fd() == fd)
        else {
            return false;
        };
        self.read_peer(index, deferred);
        true
    }

    fn accept_peers(&mut self) {
        let host_ip = self.registry.host_ip();
        let registry = &self.registry;
        self.peers.accept(host_ip, |ip| registry.places_on(ip));
    }

    /// Reads from incoming peer `index` and applies what it said.
    fn read_peer(&mut self, index: usize, deferred: &mut Deferred) {
        let mut messages = Vec::new();
        let incoming = &mut self.peers.incoming[index];
        let keep = incoming.read(&mut messages);
        let from = incoming.from;
        if !incoming.heard && !messages.is_empty() {
            incoming.heard = true;
            if let Some(peer) = self.peers.outgoing.get_mut(&from) {
                peer.heard_from(Instant::now());
            }
        }
        if !keep {
            self.peers.incoming.swap_remove(index);
            // The table came over this connection: without it, it may be stale (a restarted
            // router has none). New connects to that host fall back until it sends a new one.
            // Unless a newer connection from that host brought one already (the restarted
            // router's, read before the old connection's end).
            if !self.peers.incoming.iter().any(|p| p.from == from) {
                self.listeners.forget_remote(from);
                self.forget_claims_of(from);
            }
        }
        for msg in messages {
            self.apply(from, msg);
        }
        self.answer_pending(deferred, Instant::now());
    }

    /// Applies what peer `from` said. A peer speaks only for its own address.
    pub(super) fn apply(&mut self, from: Ipv4Addr, msg: PeerMsg) {
        match msg {
            PeerMsg::Listeners { host, entries } if host == from => {
                self.listeners.set_remote(host, entries);
            }
            PeerMsg::Conn {
                host,
                host_port,
                ip,
                port,
                to_port,
            } if host == from => {
                let conn = HostEndpoint::new(host, host_port);
                self.record_conn(conn, OverlayEndpoint::new(ip, port), to_port);
            }
            PeerMsg::Claim {
                host,
                ip,
                to_port,
                ports,
                fresh,
            } if host == from => self.record_claim(host, ip, to_port, ports, fresh),
            PeerMsg::Release {
                host,
                ip,
                to_port,
                ports,
            } if host == from => self.record_release(host, ip, to_port, ports),
            PeerMsg::Cm { host, msg } if host == from => self.cm_inbox.push((host, msg)),
            other => {
                log::warn!("tcp: peer {from} spoke for another host: {other:?}")
            }
        }
    }

    /// What a new connection to a peer router starts with: our listener table, then our
    /// claims (claims sent while the peer was away were dropped).
    fn first_lines(&self, dst_host: Ipv4Addr) -> Vec<u8> {
        let Some(host_ip) = self.registry.host_ip() else {
            return Vec::new();
        };
        let mut lines = self.listeners.table(host_ip).encode_line();
        lines.extend(self.claims.claim_lines(host_ip, dst_host));
        lines
    }

    pub(super) fn broadcast_listeners(&mut self) {
        let Some(host_ip) = self.registry.host_ip() else {
            return;
        };
        let msg = self.listeners.table(host_ip);
        let hosts: Vec<Ipv4Addr> = self.peers.outgoing.keys().copied().collect();
        for host in hosts {
            self.send_to(host, &msg);
        }
    }

    /// Sends `msg` to `host`'s router, connecting first if no connection is up or on its way.
    pub(super) fn send_to(&mut self, host: Ipv4Addr, msg: &PeerMsg) {
        let Some(peer) = self.peers.outgoing.get(&host) else {
            return;
        };
        if peer.stream.is_none() && peer.connecting.is_none() {
            let table = self.first_lines(host);
            let peer = self.peers.outgoing.get_mut(&host).expect("present");
            peer.try_connect(host, table);
        }
        let peer = self.peers.outgoing.get_mut(&host).expect("present");
        peer.write(host, msg);
    }

    /// Gives up connections on their way whose time is up, and reconnects the lost peers.
    pub(super) fn reconnect_peers(&mut self, now: Instant) {
        self.peers.expire_connecting(now);
        for host in self.peers.lost(now) {
            let first = self.first_lines(host);
            let peer = self.peers.outgoing.get_mut(&host).expect("present");
            peer.try_connect(host, first);
        }
    }
}
