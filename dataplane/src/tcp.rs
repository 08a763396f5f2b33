//! TCP mode in the router: the setup half. A container's `libfsocket.so` asks, over its attach
//! connection, to connect to or listen on an overlay address; the router answers with a
//! host-network socket that the shim puts under the application's fd. After that the bytes flow
//! on the host network and never touch the router.
//!
//! - listen: a host socket listening on an ephemeral port of this host's address. The router
//!   keeps a duplicate so the port cannot be reused by someone else while the listener is
//!   registered, and tells every peer router "overlay ip:port is at host:port".
//! - connect: only to registered overlay addresses of the caller's tenant that have an
//!   accelerated listener; the router binds a host socket, tells the destination's router which
//!   overlay address this host port stands for, starts a non-blocking connect and hands the
//!   connecting socket over, so EINPROGRESS, SO_ERROR and ECONNREFUSED are the kernel's own.
//!   Anything else gets "fall back": the shim connects over the overlay as without Freeflow.
//! - resolve: an accepted connection's host peer address back to the overlay address the
//!   client's router announced; unknown peers (someone on the host network who was never
//!   announced) are refused, so a listener sees only connections made through Freeflow.
//!
//! Router-to-router messages (JSON lines on TCP to each host's peer port) carry listener tables
//! and connection announcements. Peers are accepted only from registered host addresses.

use crate::sys::{self, GuardedAccept, Untrusted};
use freeflow_proto::control::{ContainerEntry, NetworkView};
use freeflow_proto::sockmsg::{
    SockNotice, SockOp, SockReply, SockRequest, SockStatus, FLAG_INET6, FLAG_ORPHAN, FLAG_REUSEPORT,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{self, BufRead, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// How long a resolve waits for the client router's announcement.
const RESOLVE_WAIT: Duration = Duration::from_secs(1);
/// How long an announcement is kept (the accept that needs it comes right after the connect).
const ANNOUNCEMENT_TTL: Duration = Duration::from_secs(120);
/// How long a listener outlives its last known holder: a forked child that inherited it (a
/// daemonizing server, a pre-fork server whose parent exits) claims it within this time.
const ORPHAN_GRACE: Duration = Duration::from_secs(2);
/// How often a lost peer connection is retried.
const PEER_RETRY: Duration = Duration::from_millis(300);
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_PEER_LINE: usize = 1 << 20;
/// How long a client that reached an overlay listener without Freeflow waits, in the router,
/// for the application to accept it through the host listener.
const RELAY_TTL: Duration = Duration::from_secs(60);
/// Clients taken from one overlay listener per wake-up (the rest wait for the next turn).
const RELAY_BATCH: usize = 64;
/// Clients without Freeflow held for one listener's application at most; more are turned away
/// (reset), as a full accept queue would, so that a container cannot pile up the router's fds.
const MAX_RELAYS_PER_LISTENER: usize = 256;
/// Relayed clients waiting in all (each holds two fds and a host port).
const MAX_RELAYS: usize = 4096;
/// Accelerated listeners one container may have.
const MAX_LISTENERS_PER_CONTAINER: usize = 256;
/// Host sockets kept created and bound ahead of connects (IPv4), so that a connect request
/// costs only the connect: they are made after replies, off the requester's path.
const SPARE_SOCKETS: usize = 4;

/// Host sockets bound ahead for one container's connects to one listener of another host,
/// their ports claimed to that host's router in advance (see [`ClaimPool`]): refilled to this
/// many...
const CLAIM_POOL_SIZE: usize = 6;
/// ...when fewer than this many are left (one claim message per several connects).
const CLAIM_POOL_LOW: usize = 2;
/// Listeners one container keeps pools for (the most recently used).
const POOLS_PER_CONTAINER: usize = 4;
/// A pool not used for this long is given back.
const CLAIM_POOL_IDLE: Duration = Duration::from_secs(60);
/// Claims are said again this often, well within [`ANNOUNCEMENT_TTL`].
const CLAIM_REFRESH: Duration = Duration::from_secs(30);
/// How often pools are checked for being given back.
const POOL_SWEEP: Duration = Duration::from_secs(1);
/// Sockets in all pools at most (each holds a host port).
const MAX_CLAIMED: usize = 1024;
/// Ports one claim or release message may name.
const MAX_CLAIM_PORTS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ListenerEntry {
    ip: Ipv4Addr,
    port: u16,
    host_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum PeerMsg {
    /// The sender's complete listener table (replaces what the receiver had for that host).
    Listeners {
        host: Ipv4Addr,
        entries: Vec<ListenerEntry>,
    },
    /// Host port `host_port` of the sender is the overlay address `ip:port`; it is about to
    /// connect to the receiver's listener on host port `to_port`.
    Conn {
        host: Ipv4Addr,
        host_port: u16,
        ip: Ipv4Addr,
        port: u16,
        #[serde(default)]
        to_port: Option<u16>,
    },
    /// Host ports `ports` of the sender are bound for connects of the overlay address `ip` to
    /// the receiver's listener on host port `to_port` (each port is also its overlay port):
    /// announcements made ahead, so that neither router is on the connect's critical path.
    /// `fresh`: newly bound ports (the listener's processes are told); otherwise said again.
    Claim {
        host: Ipv4Addr,
        ip: Ipv4Addr,
        to_port: u16,
        ports: Vec<u16>,
        fresh: bool,
    },
    /// Claimed or announced ports given back unused (a claim's pool went, a connect failed).
    Release {
        host: Ipv4Addr,
        ip: Ipv4Addr,
        to_port: u16,
        ports: Vec<u16>,
    },
}

/// One container's pool of claimed host sockets for one listener of another host. A connect
/// there takes one if the connection to that host's router is up (then the claims reached it:
/// a reconnection sends them all again) and sends nothing: the peer router has recorded the
/// claim as it records a connect's announcement, and told the listener's processes, so their
/// accept needs no round trip either. The ports stay bound by this router until used, so no
/// one else can connect from them meanwhile.
struct ClaimPool {
    sockets: Vec<(OwnedFd, u16)>,
    used_at: Instant,
    claimed_at: Instant,
}

/// A container's connects to the listener on host port `to_port` of `dst_host`: what an
/// announcement or a claim names, and the key of a claim pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Target {
    container: Ipv4Addr,
    dst_host: Ipv4Addr,
    to_port: u16,
}

struct LocalListener {
    /// Attachments (processes) holding the listener; it is kept while any is alive.
    owners: Vec<u32>,
    /// Since when no holder is known.
    orphaned_at: Option<Instant>,
    host_port: u16,
    /// Created for an application socket with SO_REUSEPORT: other processes of the container
    /// asking for the same port with SO_REUSEPORT share it.
    reuseport: bool,
    /// Keeps the socket (and its port) alive while registered. The container holds it too.
    socket: Untrusted,
    /// The application's own socket, listening on the overlay address in the container, for
    /// clients that come without Freeflow (not accelerated; relayed once, at accept).
    overlay: Option<Untrusted>,
}

impl LocalListener {
    /// No known holder any more: kept for the orphan grace (a forked child may claim it), but
    /// its overlay socket goes at once, so that the port is free in the container for a server
    /// that restarts (clients without Freeflow are refused meanwhile).
    fn orphan(&mut self, now: Instant) {
        self.orphaned_at = Some(now);
        if let Some(overlay) = self.overlay.take() {
            overlay.close_if_listening();
        }
    }
}

/// A client that reached an overlay listener without Freeflow, waiting to be accepted: the
/// router connected `doorbell` to the host listener, and the application's accept of that
/// connection gets `conn` instead.
struct Relay {
    conn: OwnedFd,
    _doorbell: OwnedFd,
    listener: (Ipv4Addr, u16),
    peer: (Ipv4Addr, u16),
    since: Instant,
}

struct PeerIn {
    stream: TcpStream,
    from: Ipv4Addr,
    buf: Vec<u8>,
}

struct PeerOut {
    port: u16,
    stream: Option<TcpStream>,
    /// A connection on its way (non-blocking: an unreachable peer must not stall the control
    /// thread), its deadline, and what to send once it is up (our table first).
    connecting: Option<(TcpStream, Instant)>,
    queue: Vec<u8>,
    next_try: Instant,
}

/// Bytes kept for a peer while its connection is being made; beyond, they are dropped (the
/// table goes first on every new connection anyway; a lost announcement costs a Resolve).
const MAX_PEER_QUEUE: usize = 1 << 20;

fn peer_line(msg: &PeerMsg) -> Vec<u8> {
    let mut line = serde_json::to_vec(msg).expect("peer messages serialise");
    line.push(b'\n');
    line
}

/// What a client's router said about one of its connections.
struct Announced {
    ip: Ipv4Addr,
    port: u16,
    at: Instant,
    to_port: Option<u16>,
    /// Claimed ahead (the port may still be unused): forgotten when the claiming router's
    /// connection ends, since its unused ports are then free for anyone on that host.
    claimed: bool,
}

impl Announced {
    /// Whether it says host port → overlay address `ip`, for the listener on host port `to_port`.
    fn names(&self, ip: Ipv4Addr, to_port: u16) -> bool {
        self.ip == ip && self.to_port == Some(to_port)
    }
}

/// The error of a bind or connect that found no usable local port.
fn port_taken(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRINUSE) | Some(libc::EADDRNOTAVAIL)
    )
}

/// A resolve waiting for its announcement.
pub struct PendingResolve {
    pub attachment: u32,
    listener_ip: Ipv4Addr,
    pub seq: u32,
    key: (Ipv4Addr, u16),
    deadline: Instant,
}

/// The caller of a request, as the attach check established it.
pub struct Caller<'a> {
    pub attachment: u32,
    pub container: &'a ContainerEntry,
}

#[derive(Default)]
pub struct TcpService {
    network: Option<NetworkView>,
    overlay: HashMap<Ipv4Addr, (String, Ipv4Addr)>,
    local: HashMap<(Ipv4Addr, u16), LocalListener>,
    /// Listeners of other hosts: (host, overlay ip, overlay port) -> host port.
    remote: HashMap<(Ipv4Addr, Ipv4Addr, u16), u16>,
    /// Host address of a client -> its overlay address, when announced, and the host port of
    /// the listener it connects to.
    announced: HashMap<(Ipv4Addr, u16), Announced>,
    /// Relayed clients by the doorbell's host address.
    relays: HashMap<(Ipv4Addr, u16), Relay>,
    pending: Vec<PendingResolve>,
    /// Notices for the listeners' processes, for the control loop to send.
    pub notices: Vec<(u32, SockNotice)>,
    /// Bound, unconnected IPv4 host sockets and their ports (never handed out unconnected).
    spare: Vec<(OwnedFd, u16)>,
    /// Claimed sockets by container (overlay address), for connects to other hosts.
    pools: HashMap<Target, ClaimPool>,
    /// Claimed ports whose socket closed unused (its connect failed), to give back.
    unused_claims: Vec<(Target, u16)>,
    pools_swept_at: Option<Instant>,
    binder: PortBinder,
    peer_listener: Option<TcpListener>,
    incoming: Vec<PeerIn>,
    outgoing: HashMap<Ipv4Addr, PeerOut>,
    pub connects: u64,
    pub fallbacks: u64,
    pub relayed: u64,
    pub claimed: u64,
    /// Accepts on overlay listeners (which containers share) run under this timer.
    guard: Option<GuardedAccept>,
}

/// Replies that became ready outside a request (resolves whose announcement arrived or timed out).
pub type Deferred = Vec<(u32, SockReply)>;

impl TcpService {
    /// Takes a new view of the cluster: overlay addresses, this host, peer hosts.
    pub fn set_network(&mut self, network: NetworkView) {
        self.overlay = network
            .overlay
            .iter()
            .map(|e| (e.ip, (e.tenant.clone(), e.host_ip)))
            .collect();
        let host_changed = self.network.as_ref().map(|n| (n.host_ip, n.peer_port))
            != Some((network.host_ip, network.peer_port));
        if host_changed {
            self.spare.clear();
            self.pools.clear();
        }
        if host_changed || self.peer_listener.is_none() {
            let addr = SocketAddr::V4(SocketAddrV4::new(network.host_ip, network.peer_port));
            match TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|_| l)) {
                Ok(l) => self.peer_listener = Some(l),
                Err(e) => {
                    eprintln!("freeflow-router: tcp: cannot listen for peer routers on {addr}: {e}")
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
            });
        }
        self.remote
            .retain(|(host, _, _), _| wanted.contains_key(host));
        self.network = Some(network);
    }

    fn host_ip(&self) -> Option<Ipv4Addr> {
        self.network.as_ref().map(|n| n.host_ip)
    }

    /// Serves one request. Returns the reply and the socket to pass with it, or `None` when the
    /// reply is deferred (a resolve waiting for its announcement).
    /// `passed` are the descriptors that came with the request (a Listen carries at most one, a
    /// Relisten two; the control thread refuses others).
    pub fn handle(
        &mut self,
        caller: Caller<'_>,
        req: SockRequest,
        passed: Vec<Untrusted>,
    ) -> Option<(SockReply, Option<OwnedFd>)> {
        let Some(host_ip) = self.host_ip() else {
            // A router without a network view (run alone) accelerates nothing.
            return Some((SockReply::fallback(req.seq), None));
        };
        let v6 = req.flags & FLAG_INET6 != 0;
        match req.op {
            SockOp::Connect => Some(self.connect(caller, req, host_ip, v6)),
            SockOp::Listen => {
                Some(self.listen(caller, req, host_ip, v6, passed.into_iter().next()))
            }
            SockOp::Relisten => Some(self.relisten(caller, req, host_ip, passed)),
            SockOp::Unlisten => {
                // One holder let go; the listener goes when the last one does (forked children
                // and SO_REUSEPORT peers may still serve it).
                let key = (caller.container.ip, req.port);
                if let Some(l) = self.local.get_mut(&key) {
                    let held = !l.owners.is_empty();
                    l.owners.retain(|&a| a != caller.attachment);
                    if held && l.owners.is_empty() {
                        if req.flags & FLAG_ORPHAN != 0 {
                            l.orphan(Instant::now());
                        } else {
                            self.local.remove(&key);
                            self.broadcast_listeners();
                        }
                    }
                }
                Some((ok(req.seq, caller.container.ip, req.port), None))
            }
            SockOp::Own => {
                let key = (caller.container.ip, req.port);
                match self.local.get_mut(&key) {
                    Some(l) => {
                        if !l.owners.contains(&caller.attachment) {
                            l.owners.push(caller.attachment);
                        }
                        l.orphaned_at = None;
                        Some((ok(req.seq, caller.container.ip, req.port), None))
                    }
                    None => Some((SockReply::error(req.seq, libc::ENOENT), None)),
                }
            }
            SockOp::Resolve => {
                let key = (req.ip, req.port);
                if let Some(relay) = self.relays.get(&key) {
                    // Only the container that holds the listener gets the client.
                    if relay.listener.0 != caller.container.ip {
                        return Some((SockReply::error(req.seq, libc::ECONNREFUSED), None));
                    }
                    let relay = self.relays.remove(&key).expect("present");
                    self.relayed += 1;
                    return Some((ok(req.seq, relay.peer.0, relay.peer.1), Some(relay.conn)));
                }
                match self.lookup_announcement(key, caller.container.ip) {
                    Some((ip, port)) => Some((ok(req.seq, ip, port), None)),
                    None => {
                        self.pending.push(PendingResolve {
                            attachment: caller.attachment,
                            listener_ip: caller.container.ip,
                            seq: req.seq,
                            key,
                            deadline: Instant::now() + RESOLVE_WAIT,
                        });
                        None
                    }
                }
            }
        }
    }

    /// The overlay address announced for host address `key`, for a listener of container
    /// `listener_ip`: only if the registry places that overlay address on the announcing host,
    /// in the listener's tenant, and the announcement names one of that container's listeners
    /// (no container learns about connections to another).
    fn lookup_announcement(
        &self,
        key: (Ipv4Addr, u16),
        listener_ip: Ipv4Addr,
    ) -> Option<(Ipv4Addr, u16)> {
        let a = self.announced.get(&key)?;
        let (client_tenant, client_host) = self.overlay.get(&a.ip)?;
        let (listener_tenant, _) = self.overlay.get(&listener_ip)?;
        // A claim names no listener: any of the container's will do.
        let targets_listener = self
            .local
            .iter()
            .any(|(&(ip, _), l)| ip == listener_ip && a.to_port.is_none_or(|to| l.host_port == to));
        (*client_host == key.0 && client_tenant == listener_tenant && targets_listener)
            .then_some((a.ip, a.port))
    }

    fn connect(
        &mut self,
        caller: Caller<'_>,
        req: SockRequest,
        host_ip: Ipv4Addr,
        v6: bool,
    ) -> (SockReply, Option<OwnedFd>) {
        let dst = (req.ip, req.port);
        // Policy: only registered overlay addresses of the caller's own tenant.
        let Some((tenant, dst_host)) = self.overlay.get(&req.ip).cloned() else {
            self.fallbacks += 1;
            return (SockReply::fallback(req.seq), None);
        };
        if tenant != caller.container.tenant {
            self.fallbacks += 1;
            return (SockReply::fallback(req.seq), None);
        }
        let target = if dst_host == host_ip {
            self.local.get(&dst).map(|l| (host_ip, l.host_port))
        } else {
            self.remote
                .get(&(dst_host, dst.0, dst.1))
                .map(|&host_port| (dst_host, host_port))
        };
        let Some((target_ip, target_port)) = target else {
            self.fallbacks += 1;
            return (SockReply::fallback(req.seq), None);
        };
        let key = Target {
            container: caller.container.ip,
            dst_host,
            to_port: target_port,
        };
        let claimed = if dst_host != host_ip && !v6 {
            self.take_claimed(key)
        } else {
            None
        };
        if let Some((socket, port)) = claimed {
            match sys::connect_nonblocking(&socket, target_ip, target_port, v6) {
                Ok(_) => {
                    self.connects += 1;
                    self.claimed += 1;
                    return (ok(req.seq, caller.container.ip, port), Some(socket));
                }
                // The four-tuple is taken (a connection from that port to this listener in
                // TIME_WAIT): the port is given back (the socket closes here, so the claim
                // must go too), and the general way below is taken.
                Err(e) if port_taken(&e) => self.unused_claims.push((key, port)),
                Err(e) => {
                    return (
                        SockReply::error(req.seq, e.raw_os_error().unwrap_or(libc::EIO)),
                        None,
                    )
                }
            }
        }
        let spare = if v6 { None } else { self.spare.pop() };
        let bound = spare
            .map(Ok)
            .unwrap_or_else(|| self.binder.bind(host_ip, v6));
        let result = match bound {
            Ok((socket, port)) => {
                // Announce before connecting, so the announcement is on its way before the SYN.
                self.announce(key, host_ip, port);
                let connected = sys::connect_nonblocking(&socket, target_ip, target_port, v6);
                if connected.is_err() {
                    // The port is free again (the socket closes here): take the word back.
                    self.retract(key, host_ip, port);
                }
                connected.map(|_| (socket, port))
            }
            Err(e) => Err(e),
        };
        if result.as_ref().is_err_and(port_taken) {
            // No port is free for every destination (many connections in TIME_WAIT), or not
            // towards this one. A port connect picks would be announced only after the SYN,
            // and the server could meet an older announcement of that port first: the overlay
            // is the safe way (the server's router relays the client at accept).
            self.fallbacks += 1;
            return (SockReply::fallback(req.seq), None);
        }
        match result {
            Ok((socket, port)) => {
                self.connects += 1;
                (ok(req.seq, caller.container.ip, port), Some(socket))
            }
            Err(e) => (
                SockReply::error(req.seq, e.raw_os_error().unwrap_or(libc::EIO)),
                None,
            ),
        }
    }

    /// Tells the destination's router (or this router's own listeners) which overlay address
    /// host port `port` stands for.
    fn announce(&mut self, t: Target, host_ip: Ipv4Addr, port: u16) {
        if t.dst_host == host_ip {
            self.announced.insert(
                (host_ip, port),
                Announced {
                    ip: t.container,
                    port,
                    at: Instant::now(),
                    to_port: Some(t.to_port),
                    claimed: false,
                },
            );
            self.notify(t.to_port, (host_ip, port));
        } else {
            let conn = PeerMsg::Conn {
                host: host_ip,
                host_port: port,
                ip: t.container,
                port,
                to_port: Some(t.to_port),
            };
            self.send_to(t.dst_host, &conn);
        }
    }

    /// Takes back the announcement of host port `port`, whose connect failed.
    fn retract(&mut self, t: Target, host_ip: Ipv4Addr, port: u16) {
        if t.dst_host == host_ip {
            let key = (host_ip, port);
            if self
                .announced
                .get(&key)
                .is_some_and(|e| e.names(t.container, t.to_port))
            {
                self.announced.remove(&key);
                self.tell_listener(t.to_port, SockNotice::forget(key));
            }
        } else {
            self.send_release(t, &[port]);
        }
    }

    /// A socket of the pool `key`, if its claims are known at the destination (the connection
    /// to that host's router is up). The first connect to a listener makes its pool (filled by
    /// `tick`, after the reply); a container keeps pools for a few listeners.
    fn take_claimed(&mut self, key: Target) -> Option<(OwnedFd, u16)> {
        let now = Instant::now();
        if !self.pools.contains_key(&key) {
            let mine: Vec<(Target, Instant)> = self
                .pools
                .iter()
                .filter(|(k, _)| k.container == key.container)
                .map(|(k, p)| (*k, p.used_at))
                .collect();
            if mine.len() >= POOLS_PER_CONTAINER {
                if let Some(&(oldest, _)) = mine.iter().min_by_key(|(_, at)| *at) {
                    self.release_pool(oldest);
                }
            }
            self.pools.insert(
                key,
                ClaimPool {
                    sockets: Vec::new(),
                    used_at: now,
                    claimed_at: now,
                },
            );
            return None;
        }
        let peer_up = self
            .outgoing
            .get(&key.dst_host)
            .is_some_and(|p| p.stream.is_some());
        let pool = self.pools.get_mut(&key).expect("present");
        pool.used_at = now;
        if peer_up {
            pool.sockets.pop()
        } else {
            None
        }
    }

    /// Removes pool `key`, telling its host that the ports are given back.
    fn release_pool(&mut self, key: Target) {
        let Some(pool) = self.pools.remove(&key) else {
            return;
        };
        let ports: Vec<u16> = pool.sockets.iter().map(|&(_, port)| port).collect();
        self.send_release(key, &ports);
    }

    fn send_release(&mut self, key: Target, ports: &[u16]) {
        let Some(host_ip) = self.host_ip() else {
            return;
        };
        for chunk in ports.chunks(MAX_CLAIM_PORTS) {
            let msg = PeerMsg::Release {
                host: host_ip,
                ip: key.container,
                to_port: key.to_port,
                ports: chunk.to_vec(),
            };
            self.send_to(key.dst_host, &msg);
        }
    }

    fn claim_messages(host_ip: Ipv4Addr, key: Target, ports: &[u16], fresh: bool) -> Vec<PeerMsg> {
        ports
            .chunks(MAX_CLAIM_PORTS)
            .map(|chunk| PeerMsg::Claim {
                host: host_ip,
                ip: key.container,
                to_port: key.to_port,
                ports: chunk.to_vec(),
                fresh,
            })
            .collect()
    }

    /// Claim messages of every pool for `dst_host` (sent first on a new connection to it).
    fn claim_lines(&self, host_ip: Ipv4Addr, dst_host: Ipv4Addr) -> Vec<u8> {
        let mut lines = Vec::new();
        for (&key, pool) in self.pools.iter().filter(|(k, _)| k.dst_host == dst_host) {
            let ports: Vec<u16> = pool.sockets.iter().map(|&(_, port)| port).collect();
            for msg in Self::claim_messages(host_ip, key, &ports, true) {
                lines.extend(peer_line(&msg));
            }
        }
        lines
    }

    /// Refills the pools that ran low, says the claims again when due, and gives back the
    /// pools that were not used for a while or whose container or listener went away.
    fn refill_pools(&mut self, host_ip: Ipv4Addr, now: Instant) {
        for (key, port) in std::mem::take(&mut self.unused_claims) {
            self.send_release(key, &[port]);
        }
        // The sweep for pools to give back runs once a second, not on every turn of the loop.
        if self
            .pools_swept_at
            .is_none_or(|at| now.duration_since(at) >= POOL_SWEEP)
        {
            self.pools_swept_at = Some(now);
            let listening: std::collections::HashSet<(Ipv4Addr, u16)> = self
                .remote
                .iter()
                .map(|(&(host, _, _), &port)| (host, port))
                .collect();
            let gone: Vec<Target> = self
                .pools
                .iter()
                .filter(|(key, pool)| {
                    let registered = self
                        .overlay
                        .get(&key.container)
                        .is_some_and(|(_, host)| *host == host_ip);
                    now.duration_since(pool.used_at) >= CLAIM_POOL_IDLE
                        || !registered
                        || !listening.contains(&(key.dst_host, key.to_port))
                })
                .map(|(key, _)| *key)
                .collect();
            for key in gone {
                self.release_pool(key);
            }
        }
        let mut messages = Vec::new();
        let mut room =
            MAX_CLAIMED.saturating_sub(self.pools.values().map(|p| p.sockets.len()).sum());
        for (&key, pool) in self.pools.iter_mut() {
            let mut fresh = Vec::new();
            if pool.sockets.len() < CLAIM_POOL_LOW {
                while pool.sockets.len() < CLAIM_POOL_SIZE && room > 0 {
                    match self.binder.bind(host_ip, false) {
                        Ok(bound) => {
                            fresh.push(bound.1);
                            pool.sockets.push(bound);
                            room -= 1;
                        }
                        Err(_) => break,
                    }
                }
            }
            if now.duration_since(pool.claimed_at) >= CLAIM_REFRESH {
                pool.claimed_at = now;
                let all: Vec<u16> = pool.sockets.iter().map(|&(_, port)| port).collect();
                let again: Vec<u16> = all.into_iter().filter(|p| !fresh.contains(p)).collect();
                messages.extend(
                    Self::claim_messages(host_ip, key, &again, false)
                        .into_iter()
                        .map(|m| (key.dst_host, m)),
                );
            }
            messages.extend(
                Self::claim_messages(host_ip, key, &fresh, true)
                    .into_iter()
                    .map(|m| (key.dst_host, m)),
            );
        }
        for (host, msg) in messages {
            self.send_to(host, &msg);
        }
    }

    /// Takes back what `host`'s router claimed (its connection to us ended: its unused ports
    /// are free for anyone on that host now), here and in the listeners' processes.
    fn forget_claims_of(&mut self, host: Ipv4Addr) {
        let gone: Vec<((Ipv4Addr, u16), Option<u16>)> = self
            .announced
            .iter()
            .filter(|(key, a)| key.0 == host && a.claimed)
            .map(|(key, a)| (*key, a.to_port))
            .collect();
        for (key, to_port) in gone {
            self.announced.remove(&key);
            if let Some(to_port) = to_port {
                self.tell_listener(to_port, SockNotice::forget(key));
            }
        }
    }

    /// Queues `notice` for every process holding the local listener on host port `to_port`.
    fn tell_listener(&mut self, to_port: u16, notice: SockNotice) {
        if let Some(l) = self.local.values().find(|l| l.host_port == to_port) {
            self.notices
                .extend(l.owners.iter().map(|&owner| (owner, notice)));
        }
    }

    fn listen(
        &mut self,
        caller: Caller<'_>,
        req: SockRequest,
        host_ip: Ipv4Addr,
        v6: bool,
        passed: Option<Untrusted>,
    ) -> (SockReply, Option<OwnedFd>) {
        let ip = caller.container.ip;
        if req.ip != Ipv4Addr::UNSPECIFIED && req.ip != ip {
            return (SockReply::fallback(req.seq), None);
        }
        let key = (ip, req.port);
        let reuseport = req.flags & FLAG_REUSEPORT != 0;
        if let Some(existing) = self.local.get_mut(&key) {
            let live = existing.orphaned_at.is_none();
            if live && reuseport && existing.reuseport {
                // SO_REUSEPORT on both: one more socket serves the port, in this process or
                // another of the container; it shares the host listener (the overlay socket it
                // passed is not needed: the first one already takes clients that come without
                // Freeflow).
                return match existing.socket.try_clone() {
                    Ok(shared) => {
                        if !existing.owners.contains(&caller.attachment) {
                            existing.owners.push(caller.attachment);
                        }
                        (ok(req.seq, ip, req.port), Some(shared))
                    }
                    Err(e) => (
                        SockReply::error(req.seq, e.raw_os_error().unwrap_or(libc::EIO)),
                        None,
                    ),
                };
            }
            if live && !existing.owners.contains(&caller.attachment) {
                return (SockReply::error(req.seq, libc::EADDRINUSE), None);
            }
        }
        if !self.local.contains_key(&key) && self.listeners_of(ip) >= MAX_LISTENERS_PER_CONTAINER {
            return (SockReply::error(req.seq, libc::ENOBUFS), None);
        }
        let overlay = passed.and_then(|fd| match overlay_listener_ok(&fd, req.port) {
            Ok(()) => Some(fd),
            Err(why) => {
                eprintln!(
                    "freeflow-router: tcp: container {} passed an unusable overlay listener for port {}: {why}",
                    caller.container.name, req.port
                );
                None
            }
        });
        let backlog = req.backlog.min(i32::MAX as u32) as i32;
        let result = (|| -> io::Result<(OwnedFd, OwnedFd, u16)> {
            let socket = sys::tcp_socket(v6)?;
            sys::set_reuseaddr(&socket)?;
            sys::bind(&socket, host_ip, 0, v6)?;
            sys::listen(&socket, backlog)?;
            let host_port = sys::local_port(&socket)?;
            let keep = socket.try_clone()?;
            Ok((socket, keep, host_port))
        })();
        match result {
            Ok((socket, keep, host_port)) => {
                self.local.insert(
                    key,
                    LocalListener {
                        owners: vec![caller.attachment],
                        orphaned_at: None,
                        host_port,
                        reuseport,
                        socket: Untrusted::new(keep),
                        overlay,
                    },
                );
                self.broadcast_listeners();
                (ok(req.seq, ip, req.port), Some(socket))
            }
            Err(e) => (
                SockReply::error(req.seq, e.raw_os_error().unwrap_or(libc::EIO)),
                None,
            ),
        }
    }

    /// A process that held an accelerated listener before this router started hands it back,
    /// with a new overlay listener. Checked like everything from a container: the first must be
    /// a TCP listener on this host's address (a container only has those from a router), the
    /// second a listener on the overlay port.
    fn relisten(
        &mut self,
        caller: Caller<'_>,
        req: SockRequest,
        host_ip: Ipv4Addr,
        passed: Vec<Untrusted>,
    ) -> (SockReply, Option<OwnedFd>) {
        let key = (caller.container.ip, req.port);
        let mut fds = passed.into_iter();
        let (Some(host), overlay) = (fds.next(), fds.next()) else {
            return (SockReply::error(req.seq, libc::EINVAL), None);
        };
        let host_port = match host_listener_ok(&host, host_ip) {
            Ok(port) => port,
            Err(why) => {
                eprintln!(
                    "freeflow-router: tcp: container {} handed back an unusable listener for port {}: {why}",
                    caller.container.name, req.port
                );
                return (SockReply::error(req.seq, libc::EINVAL), None);
            }
        };
        if let Some(existing) = self.local.get_mut(&key) {
            // Another holder of the same listener came first (forked processes).
            if existing.host_port != host_port {
                return (SockReply::error(req.seq, libc::EADDRINUSE), None);
            }
            if !existing.owners.contains(&caller.attachment) {
                existing.owners.push(caller.attachment);
            }
            existing.orphaned_at = None;
            return (ok(req.seq, key.0, key.1), None);
        }
        // A host port is one listener's: a container handing back a socket bound to another
        // listener's port (its own, under another overlay port) gets nothing.
        if self.local.values().any(|l| l.host_port == host_port)
            || self.listeners_of(key.0) >= MAX_LISTENERS_PER_CONTAINER
        {
            return (SockReply::error(req.seq, libc::EADDRINUSE), None);
        }
        let overlay = overlay.filter(|fd| overlay_listener_ok(fd, req.port).is_ok());
        self.local.insert(
            key,
            LocalListener {
                owners: vec![caller.attachment],
                orphaned_at: None,
                host_port,
                reuseport: req.flags & FLAG_REUSEPORT != 0,
                socket: host,
                overlay,
            },
        );
        self.broadcast_listeners();
        (ok(req.seq, key.0, key.1), None)
    }

    /// Queues a notice for every process holding the local listener on host port `to_port`:
    /// the connection from host address `from` is the overlay address announced for it.
    fn notify(&mut self, to_port: u16, from: (Ipv4Addr, u16)) {
        let Some((&(listener_ip, _), listener)) =
            self.local.iter().find(|(_, l)| l.host_port == to_port)
        else {
            return;
        };
        let owners = listener.owners.clone();
        let Some((ip, port)) = self.lookup_announcement(from, listener_ip) else {
            return;
        };
        let notice = SockNotice {
            host_ip: from.0,
            host_port: from.1,
            ip,
            port,
            sent_ms: 0,
        };
        self.notices
            .extend(owners.into_iter().map(|owner| (owner, notice)));
    }

    fn listeners_of(&self, container_ip: Ipv4Addr) -> usize {
        self.local
            .keys()
            .filter(|(ip, _)| *ip == container_ip)
            .count()
    }

    /// Stops taking clients on a listener's overlay socket (closed off the control thread).
    fn give_up_overlay(&mut self, key: (Ipv4Addr, u16)) {
        if let Some(l) = self.local.get_mut(&key) {
            l.overlay = None;
        }
    }

    /// Takes the clients waiting on the overlay listener `fd` (they came without Freeflow) and
    /// rings the host listener for each, so the application accepts them where it accepts
    /// everything else.
    fn relay_from(&mut self, fd: RawFd) {
        let Some(host_ip) = self.host_ip() else {
            return;
        };
        let Some((&key, listener)) = self
            .local
            .iter()
            .find(|(_, l)| l.overlay.as_ref().is_some_and(|o| o.as_raw_fd() == fd))
        else {
            return;
        };
        let host_port = listener.host_port;
        if self.guard.is_none() {
            match GuardedAccept::new() {
                Ok(guard) => self.guard = Some(guard),
                Err(e) => {
                    eprintln!("freeflow-router: tcp: no accept timer ({e}); overlay listeners off");
                    return self.give_up_overlay(key);
                }
            }
        }
        let guard = self.guard.as_ref().expect("set above");
        let overlay = listener.overlay.as_ref().expect("matched above");
        let mut taken = Vec::new();
        let mut give_up = None;
        for _ in 0..RELAY_BATCH {
            match guard.accept(overlay.as_fd()) {
                Ok(Some(client)) => taken.push(client),
                Ok(None) => break,
                // A client that went away, or one that is not IPv4: skip it.
                Err(e)
                    if e.kind() == io::ErrorKind::InvalidData
                        || e.kind() == io::ErrorKind::ConnectionAborted =>
                {
                    continue
                }
                // Blocked (the container cleared O_NONBLOCK), shut down, or failing: the
                // listener would keep the control thread busy or stuck; stop using it.
                Err(e) => {
                    give_up = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = give_up {
            eprintln!("freeflow-router: tcp: overlay listener {key:?} given up: {e}");
            self.give_up_overlay(key);
        }
        let held = self.relays.values().filter(|r| r.listener == key).count();
        let room = MAX_RELAYS_PER_LISTENER
            .saturating_sub(held)
            .min(MAX_RELAYS.saturating_sub(self.relays.len()));
        if taken.len() > room {
            eprintln!(
                "freeflow-router: tcp: {} clients of {key:?} turned away: {held} wait for accept",
                taken.len() - room
            );
            taken.truncate(room);
        }
        for (conn, peer_ip, peer_port) in taken {
            let doorbell = (|| -> io::Result<(OwnedFd, u16)> {
                let socket = sys::tcp_socket(false)?;
                sys::bind(&socket, host_ip, 0, false)?;
                let port = sys::local_port(&socket)?;
                sys::connect_nonblocking(&socket, host_ip, host_port, false)?;
                Ok((socket, port))
            })();
            match doorbell {
                Ok((doorbell, port)) => {
                    // The doorbell's host port may have been claimed or announced before: only
                    // a Resolve hands this client over.
                    let owners = self.local.get(&key).map(|l| l.owners.clone());
                    let forget = SockNotice::forget((host_ip, port));
                    self.notices
                        .extend(owners.into_iter().flatten().map(|o| (o, forget)));
                    self.relays.insert(
                        (host_ip, port),
                        Relay {
                            conn,
                            _doorbell: doorbell,
                            listener: key,
                            peer: (peer_ip, peer_port),
                            since: Instant::now(),
                        },
                    );
                }
                // The client's connection closes with `conn`: it sees a reset, as when a
                // server's accept queue overflows.
                Err(e) => eprintln!("freeflow-router: tcp: relay for {key:?}: {e}"),
            }
        }
    }

    /// Forgets everything an attachment registered (its process went away).
    /// Listeners it held alone stay for [`ORPHAN_GRACE`], for a forked child to claim.
    pub fn detach(&mut self, attachment: u32) {
        let now = Instant::now();
        for l in self.local.values_mut() {
            let before = l.owners.len();
            l.owners.retain(|&a| a != attachment);
            if before > 0 && l.owners.is_empty() {
                l.orphan(now);
            }
        }
        self.pending.retain(|p| p.attachment != attachment);
    }

    fn table(&self) -> Option<PeerMsg> {
        let host = self.host_ip()?;
        let mut entries: Vec<ListenerEntry> = self
            .local
            .iter()
            .map(|(&(ip, port), l)| ListenerEntry {
                ip,
                port,
                host_port: l.host_port,
            })
            .collect();
        entries.sort_by_key(|e| (e.ip, e.port));
        Some(PeerMsg::Listeners { host, entries })
    }

    /// What a new connection to a peer router starts with: our listener table, then our
    /// claims (claims sent while the peer was away were dropped).
    fn first_lines(&self, dst_host: Ipv4Addr) -> Vec<u8> {
        let Some(table) = self.table() else {
            return Vec::new();
        };
        let mut lines = peer_line(&table);
        if let Some(host_ip) = self.host_ip() {
            lines.extend(self.claim_lines(host_ip, dst_host));
        }
        lines
    }

    fn broadcast_listeners(&mut self) {
        let Some(msg) = self.table() else { return };
        let hosts: Vec<Ipv4Addr> = self.outgoing.keys().copied().collect();
        for host in hosts {
            self.send_to(host, &msg);
        }
    }

    fn send_to(&mut self, host: Ipv4Addr, msg: &PeerMsg) {
        let Some(peer) = self.outgoing.get_mut(&host) else {
            return;
        };
        if peer.stream.is_none() && peer.connecting.is_none() {
            let table = self.first_lines(host);
            let peer = self.outgoing.get_mut(&host).expect("present");
            Self::try_connect(host, peer, table);
        }
        let peer = self.outgoing.get_mut(&host).expect("present");
        Self::write(host, peer, msg);
    }

    /// Starts connecting to a peer (without waiting); `first` is sent once connected (a fresh
    /// connection starts with our whole table).
    fn try_connect(host: Ipv4Addr, peer: &mut PeerOut, first: Vec<u8>) {
        if Instant::now() < peer.next_try || peer.stream.is_some() || peer.connecting.is_some() {
            return;
        }
        peer.next_try = Instant::now() + PEER_RETRY;
        let started = sys::tcp_socket(false).and_then(|socket| {
            let done = sys::connect_nonblocking(&socket, host, peer.port, false)?;
            Ok((TcpStream::from(socket), done))
        });
        match started {
            Ok((stream, _)) => {
                peer.queue = first;
                peer.connecting = Some((stream, Instant::now() + PEER_CONNECT_TIMEOUT));
            }
            Err(e) => eprintln!("freeflow-router: tcp: peer router {host} not reachable: {e}"),
        }
    }

    /// The connection to a peer finished connecting (it polled writable): up, or failed.
    fn finish_connect(host: Ipv4Addr, peer: &mut PeerOut) {
        let Some((stream, _)) = peer.connecting.take() else {
            return;
        };
        let queued = std::mem::take(&mut peer.queue);
        let up = match stream.take_error() {
            Ok(None) => stream.peer_addr().is_ok(),
            _ => false,
        };
        if !up {
            eprintln!("freeflow-router: tcp: peer router {host} not reachable");
            return;
        }
        // Stays non-blocking: a peer that stops reading must not stall the control thread;
        // what it does not take waits in `queue`.
        let _ = stream.set_nodelay(true);
        peer.stream = Some(stream);
        Self::write_bytes(host, peer, &queued);
    }

    fn write(host: Ipv4Addr, peer: &mut PeerOut, msg: &PeerMsg) {
        let line = peer_line(msg);
        if peer.stream.is_some() {
            Self::write_bytes(host, peer, &line);
        } else if peer.connecting.is_some() && peer.queue.len() + line.len() <= MAX_PEER_QUEUE {
            peer.queue.extend_from_slice(&line);
        }
    }

    /// Writes what the connection takes now and queues the rest behind what already waits.
    /// A peer that lets more than [`MAX_PEER_QUEUE`] pile up is dropped: the connection made
    /// anew starts with our table and claims; announcements lost with it cost Resolves that
    /// time out.
    fn write_bytes(host: Ipv4Addr, peer: &mut PeerOut, bytes: &[u8]) {
        if peer.stream.is_none() {
            return;
        }
        if peer.queue.len() + bytes.len() > MAX_PEER_QUEUE {
            eprintln!("freeflow-router: tcp: peer router {host} does not read; reconnecting");
            peer.stream = None;
            peer.queue.clear();
            return;
        }
        peer.queue.extend_from_slice(bytes);
        Self::flush(host, peer);
    }

    /// Writes queued bytes until the connection would block.
    fn flush(host: Ipv4Addr, peer: &mut PeerOut) {
        let Some(stream) = peer.stream.as_mut() else {
            return;
        };
        let mut sent = 0;
        while sent < peer.queue.len() {
            match stream.write(&peer.queue[sent..]) {
                Ok(0) => break,
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("freeflow-router: tcp: lost peer router {host}: {e}");
                    peer.stream = None;
                    peer.queue.clear();
                    return;
                }
            }
        }
        peer.queue.drain(..sent);
    }

    /// Descriptors the control loop must poll for the peer channel.
    pub fn poll_fds(&self) -> Vec<(RawFd, i16)> {
        let mut fds: Vec<RawFd> = self.peer_listener.iter().map(|l| l.as_raw_fd()).collect();
        fds.extend(self.incoming.iter().map(|p| p.stream.as_raw_fd()));
        // Outgoing connections too: a peer never writes on them, so readable means it closed
        // or reset. Noticing that at once matters: a write into a dead connection can still
        // succeed locally, and the announcement in it would be lost.
        fds.extend(
            self.local
                .values()
                .filter_map(|l| l.overlay.as_ref().map(|o| o.as_raw_fd())),
        );
        let mut with_events: Vec<(RawFd, i16)> =
            fds.into_iter().map(|fd| (fd, libc::POLLIN)).collect();
        // Up connections to peers: writable matters only while bytes wait.
        with_events.extend(self.outgoing.values().filter_map(|p| {
            let s = p.stream.as_ref()?;
            let out = if p.queue.is_empty() { 0 } else { libc::POLLOUT };
            Some((s.as_raw_fd(), libc::POLLIN | out))
        }));
        // Connections to peers on their way: writable when done.
        with_events.extend(
            self.outgoing
                .values()
                .filter_map(|p| p.connecting.as_ref())
                .map(|(s, _)| (s.as_raw_fd(), libc::POLLOUT)),
        );
        with_events
    }

    /// Milliseconds until the service needs a tick (pending resolves, peer retries), if ever.
    pub fn next_timeout_ms(&self, now: Instant) -> Option<i32> {
        let resolve = self
            .pending
            .iter()
            .map(|p| p.deadline)
            .chain(
                self.local
                    .values()
                    .filter_map(|l| l.orphaned_at.map(|at| at + ORPHAN_GRACE)),
            )
            .min();
        let retry = self
            .outgoing
            .values()
            .filter(|p| p.stream.is_none())
            .map(|p| match &p.connecting {
                Some((_, deadline)) => *deadline,
                None => p.next_try,
            })
            .min();
        let relay = self.relays.values().map(|r| r.since + RELAY_TTL).min();
        [resolve, retry, relay]
            .into_iter()
            .flatten()
            .min()
            .map(|t| t.saturating_duration_since(now).as_millis() as i32 + 1)
    }

    /// Handles readiness on `fd` (one of `poll_fds`), answering resolves that can now be
    /// answered.
    pub fn on_ready(&mut self, fd: RawFd, revents: i16, deferred: &mut Deferred) {
        if self
            .peer_listener
            .as_ref()
            .is_some_and(|l| l.as_raw_fd() == fd)
        {
            self.accept_peers();
            return;
        }
        if let Some((&host, peer)) = self.outgoing.iter_mut().find(|(_, p)| {
            p.connecting
                .as_ref()
                .is_some_and(|(s, _)| s.as_raw_fd() == fd)
        }) {
            Self::finish_connect(host, peer);
            return;
        }
        if let Some((host, peer)) = self
            .outgoing
            .iter_mut()
            .find(|(_, p)| p.stream.as_ref().is_some_and(|s| s.as_raw_fd() == fd))
        {
            if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) == 0 {
                // Only writable: room for what waits.
                return Self::flush(*host, peer);
            }
            eprintln!(
                "freeflow-router: tcp: peer router {host} closed our connection; reconnecting"
            );
            peer.stream = None;
            peer.next_try = Instant::now();
            let host = *host;
            self.forget_listeners_of(host);
            return;
        }
        let Some(index) = self
            .incoming
            .iter()
            .position(|p| p.stream.as_raw_fd() == fd)
        else {
            return self.relay_from(fd);
        };
        let mut messages = Vec::new();
        let keep = Self::read_peer(&mut self.incoming[index], &mut messages);
        let from = self.incoming[index].from;
        if !keep {
            self.incoming.swap_remove(index);
            // The table came over this connection: without it, it may be stale (a restarted
            // router has none). New connects to that host fall back until it sends a new one.
            // Unless a newer connection from that host brought one already (the restarted
            // router's, read before the old connection's end).
            if !self.incoming.iter().any(|p| p.from == from) {
                self.forget_listeners_of(from);
                self.forget_claims_of(from);
            }
        }
        for msg in messages {
            self.apply(from, msg);
        }
        self.answer_pending(deferred, Instant::now());
    }

    fn forget_listeners_of(&mut self, host: Ipv4Addr) {
        self.remote.retain(|&(h, _, _), _| h != host);
    }

    fn accept_peers(&mut self) {
        let Some(listener) = self.peer_listener.as_ref() else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((stream, SocketAddr::V4(addr))) => {
                    // Never from this host's own address: only the router itself is there, and
                    // containers can bind sockets to it (IP_FREEBIND).
                    let known = (self.overlay.values().any(|(_, h)| h == addr.ip())
                        || self.outgoing.contains_key(addr.ip()))
                        && Some(*addr.ip()) != self.host_ip();
                    if !known {
                        eprintln!("freeflow-router: tcp: refused peer connection from {addr}: not a registered host");
                        continue;
                    }
                    if stream.set_nonblocking(true).is_ok() {
                        self.incoming.push(PeerIn {
                            stream,
                            from: *addr.ip(),
                            buf: Vec::new(),
                        });
                    }
                }
                Ok((_, addr)) => {
                    eprintln!("freeflow-router: tcp: refused peer connection from {addr}")
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    eprintln!("freeflow-router: tcp: accept on peer port: {e}");
                    return;
                }
            }
        }
    }

    /// Reads what is available; false when the peer is gone or misbehaved.
    fn read_peer(peer: &mut PeerIn, out: &mut Vec<PeerMsg>) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match io::Read::read(&mut peer.stream, &mut chunk) {
                Ok(0) => return false,
                Ok(n) => peer.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
            if peer.buf.len() > MAX_PEER_LINE {
                eprintln!(
                    "freeflow-router: tcp: peer {} sent an oversized message; dropping it",
                    peer.from
                );
                return false;
            }
        }
        let mut cursor = io::Cursor::new(std::mem::take(&mut peer.buf));
        let mut line = Vec::new();
        loop {
            line.clear();
            match cursor.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) if line.last() == Some(&b'\n') => {
                    match serde_json::from_slice::<PeerMsg>(&line) {
                        Ok(msg) => out.push(msg),
                        Err(e) => {
                            eprintln!(
                                "freeflow-router: tcp: bad message from peer {}: {e}",
                                peer.from
                            );
                            return false;
                        }
                    }
                }
                Ok(_) => {
                    peer.buf = line.clone(); // an incomplete line: keep it for the next read
                    break;
                }
                Err(_) => return false,
            }
        }
        true
    }

    fn apply(&mut self, from: Ipv4Addr, msg: PeerMsg) {
        match msg {
            // A peer speaks only for its own address.
            PeerMsg::Listeners { host, entries } if host == from => {
                // Stored as the peer said it, attributed to the peer; whether the registry places
                // an address on that host is checked when a connect uses the entry (the peer's
                // table may arrive before our daemon has pushed us the container).
                self.remote.retain(|&(h, _, _), _| h != host);
                for e in entries {
                    self.remote.insert((host, e.ip, e.port), e.host_port);
                }
            }
            PeerMsg::Conn {
                host,
                host_port,
                ip,
                port,
                to_port,
            } if host == from => {
                // Checked against the registry when a resolve or a notice uses it, as above.
                self.announced.insert(
                    (host, host_port),
                    Announced {
                        ip,
                        port,
                        at: Instant::now(),
                        to_port,
                        claimed: false,
                    },
                );
                if let Some(to_port) = to_port {
                    self.notify(to_port, (host, host_port));
                }
            }
            PeerMsg::Claim {
                host,
                ip,
                to_port,
                ports,
                fresh,
            } if host == from => {
                if ports.len() > MAX_CLAIM_PORTS {
                    eprintln!("freeflow-router: tcp: peer {from} claimed too many ports at once");
                    return;
                }
                let now = Instant::now();
                for port in ports {
                    let key = (host, port);
                    // Said again: the processes were told (and may have used it up).
                    let known = self
                        .announced
                        .get(&key)
                        .is_some_and(|a| a.claimed && a.names(ip, to_port));
                    // Checked against the registry when a resolve or a notice uses it, as a
                    // connect's announcement.
                    self.announced.insert(
                        key,
                        Announced {
                            ip,
                            port,
                            at: now,
                            to_port: Some(to_port),
                            claimed: true,
                        },
                    );
                    if fresh || !known {
                        self.notify(to_port, key);
                    }
                }
            }
            PeerMsg::Release {
                host,
                ip,
                to_port,
                ports,
            } if host == from => {
                for port in ports.into_iter().take(MAX_CLAIM_PORTS) {
                    let key = (host, port);
                    if self
                        .announced
                        .get(&key)
                        .is_some_and(|a| a.names(ip, to_port))
                    {
                        self.announced.remove(&key);
                        self.tell_listener(to_port, SockNotice::forget(key));
                    }
                }
            }
            other => {
                eprintln!("freeflow-router: tcp: peer {from} spoke for another host: {other:?}")
            }
        }
    }

    fn answer_pending(&mut self, deferred: &mut Deferred, now: Instant) {
        let mut still = Vec::new();
        for p in std::mem::take(&mut self.pending) {
            if let Some((ip, port)) = self.lookup_announcement(p.key, p.listener_ip) {
                deferred.push((p.attachment, ok(p.seq, ip, port)));
            } else if now >= p.deadline {
                deferred.push((p.attachment, SockReply::error(p.seq, libc::ECONNREFUSED)));
            } else {
                still.push(p);
            }
        }
        self.pending = still;
    }

    /// Periodic work: expire resolves and old announcements, reconnect lost peers, make spare
    /// sockets.
    pub fn tick(&mut self, deferred: &mut Deferred) {
        let now = Instant::now();
        if let Some(host_ip) = self.host_ip() {
            while self.spare.len() < SPARE_SOCKETS {
                match self.binder.bind(host_ip, false) {
                    Ok(ready) => self.spare.push(ready),
                    Err(_) => break,
                }
            }
        }
        if let Some(host_ip) = self.host_ip() {
            self.refill_pools(host_ip, now);
        }
        self.answer_pending(deferred, now);
        self.announced
            .retain(|_, a| now.duration_since(a.at) < ANNOUNCEMENT_TTL);
        // A relayed client waits until accepted, its time is up, or its listener is gone.
        let local = &self.local;
        self.relays.retain(|_, r| {
            now.duration_since(r.since) < RELAY_TTL && local.contains_key(&r.listener)
        });
        let before = self.local.len();
        self.local.retain(|_, l| {
            l.orphaned_at
                .is_none_or(|at| now.duration_since(at) < ORPHAN_GRACE)
        });
        if self.local.len() != before {
            self.broadcast_listeners();
        }
        for (host, peer) in self.outgoing.iter_mut() {
            if peer
                .connecting
                .as_ref()
                .is_some_and(|(_, deadline)| now >= *deadline)
            {
                eprintln!("freeflow-router: tcp: peer router {host} not reachable: timed out");
                peer.connecting = None;
                peer.queue.clear();
            }
        }
        let lost: Vec<Ipv4Addr> = self
            .outgoing
            .iter()
            .filter(|(_, p)| p.stream.is_none() && p.connecting.is_none() && now >= p.next_try)
            .map(|(h, _)| *h)
            .collect();
        for host in lost {
            let first = self.first_lines(host);
            let peer = self.outgoing.get_mut(&host).expect("present");
            Self::try_connect(host, peer, first);
        }
    }

    pub fn listeners(&self) -> usize {
        self.local.len()
    }
}

/// A new host socket bound to `host_ip` and a port the kernel chose, and that port.
/// Binds host sockets to ports of their own ahead of connects, and stops trying for a while
/// when no port is free for every destination: such a bind scans the whole port range before
/// it fails, and the spares and pools would try it on every turn of the control loop.
#[derive(Default)]
struct PortBinder {
    short_until: Option<Instant>,
}

/// How long binds are not tried after one found no free port.
const PORTS_SHORT_BACKOFF: Duration = Duration::from_secs(1);

impl PortBinder {
    fn bind(&mut self, host_ip: Ipv4Addr, v6: bool) -> io::Result<(OwnedFd, u16)> {
        let now = Instant::now();
        if self.short_until.is_some_and(|until| now < until) {
            return Err(io::Error::from_raw_os_error(libc::EADDRINUSE));
        }
        let bound = bound_socket(host_ip, v6);
        if bound.as_ref().is_err_and(port_taken) {
            self.short_until = Some(now + PORTS_SHORT_BACKOFF);
        }
        bound
    }
}

fn bound_socket(host_ip: Ipv4Addr, v6: bool) -> io::Result<(OwnedFd, u16)> {
    let socket = sys::tcp_socket(v6)?;
    sys::bind(&socket, host_ip, 0, v6)?;
    let port = sys::local_port(&socket)?;
    Ok((socket, port))
}

/// Checks that a descriptor a container passed is what the shim says it is: a TCP socket
/// listening on overlay port `port`; then makes it non-blocking for the control loop. The
/// container is not trusted: anything else is refused.
fn overlay_listener_ok(fd: &Untrusted, port: u16) -> Result<(), String> {
    // Only the container's own sockets: one in our namespace would be a host socket.
    if sys::in_our_netns(fd.as_fd()).map_err(|e| e.to_string())? {
        return Err("a host-network socket".into());
    }
    let opt = |level, name| sys::int_opt(fd.as_fd(), level, name).map_err(|e| e.to_string());
    if opt(libc::SOL_SOCKET, libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err("not a stream socket".into());
    }
    let domain = opt(libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return Err("not an internet socket".into());
    }
    if opt(libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 1 {
        return Err("not listening".into());
    }
    let (_, bound) = sys::local_addr(fd.as_fd()).map_err(|e| e.to_string())?;
    if bound != port {
        return Err(format!("bound to port {bound}"));
    }
    sys::set_nonblocking(fd.as_fd()).map_err(|e| e.to_string())
}

/// Checks that a descriptor a container handed back is a TCP listener on `host_ip`; its port.
fn host_listener_ok(fd: &Untrusted, host_ip: Ipv4Addr) -> Result<u16, String> {
    // A container can bind a socket of its own to this host's address (IP_FREEBIND needs no
    // privilege), but cannot make one in our namespace: only a router gave it those.
    if !sys::in_our_netns(fd.as_fd()).map_err(|e| e.to_string())? {
        return Err("not a host-network socket".into());
    }
    let opt = |level, name| sys::int_opt(fd.as_fd(), level, name).map_err(|e| e.to_string());
    if opt(libc::SOL_SOCKET, libc::SO_TYPE)? != libc::SOCK_STREAM
        || opt(libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 1
    {
        return Err("not a TCP listener".into());
    }
    let (ip, port) = sys::local_addr(fd.as_fd()).map_err(|e| e.to_string())?;
    if ip != host_ip {
        return Err(format!("bound to {ip}, not this host"));
    }
    Ok(port)
}

fn ok(seq: u32, ip: Ipv4Addr, port: u16) -> SockReply {
    SockReply {
        status: SockStatus::Ok,
        seq,
        errno: 0,
        ip,
        port,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use freeflow_proto::control::PeerHost;

    /// A listener on loopback whose accept queue is full (listen backlog 0, nobody accepts):
    /// the kernel drops further SYNs, so a connect to it hangs, like one to a host that is down.
    fn black_hole() -> (Vec<TcpStream>, OwnedFd, u16) {
        let socket = sys::tcp_socket(false).unwrap();
        sys::bind(&socket, Ipv4Addr::LOCALHOST, 0, false).unwrap();
        sys::listen(&socket, 0).unwrap();
        let port = sys::local_port(&socket).unwrap();
        let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
        // Fill the queue; each bounded.
        let fill = (0..4)
            .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok())
            .collect();
        (fill, socket, port)
    }

    /// A blocking connect would return only after the peer answered or the timeout passed;
    /// here the connect is left under way, for the control loop to watch.
    #[test]
    fn an_unreachable_peer_does_not_stall_the_control_thread() {
        let (_fill, _hole, port) = black_hole();
        let mut tcp = TcpService::default();
        tcp.set_network(NetworkView {
            host_ip: Ipv4Addr::LOCALHOST,
            peer_port: 0,
            hosts: vec![PeerHost {
                host_ip: Ipv4Addr::LOCALHOST,
                peer_port: port,
            }],
            overlay: Vec::new(),
        });
        let mut deferred = Deferred::new();
        tcp.tick(&mut deferred);
        tcp.broadcast_listeners();
        let peer = tcp.outgoing.values().next().unwrap();
        assert!(
            peer.stream.is_none(),
            "not connected: the peer never answers"
        );
        let (connecting, _) = peer.connecting.as_ref().expect("a connect under way");
        assert!(!peer.queue.is_empty(), "our table waits to be sent");
        assert!(tcp
            .poll_fds()
            .contains(&(connecting.as_raw_fd(), libc::POLLOUT)));
        assert!(tcp.next_timeout_ms(Instant::now()).is_some());
    }

    /// A peer router that accepts our connection but never reads: our writes never wait for
    /// it; what it does not take is queued, up to a bound, and then the connection is dropped
    /// (to be made anew, starting with our table).
    #[test]
    fn a_peer_that_does_not_read_never_blocks_our_writes() {
        let peer_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = peer_listener.local_addr().unwrap().port();
        let mut tcp = TcpService::default();
        tcp.set_network(NetworkView {
            host_ip: Ipv4Addr::LOCALHOST,
            peer_port: 0,
            hosts: vec![PeerHost {
                host_ip: Ipv4Addr::LOCALHOST,
                peer_port: port,
            }],
            overlay: Vec::new(),
        });
        let mut deferred = Deferred::new();
        tcp.tick(&mut deferred);
        let connecting = {
            let peer = tcp.outgoing.get(&Ipv4Addr::LOCALHOST).unwrap();
            peer.connecting
                .as_ref()
                .expect("connect under way")
                .0
                .as_raw_fd()
        };
        // Loopback connects at once; the kernel accepts into the backlog (nobody calls accept).
        tcp.on_ready(connecting, libc::POLLOUT, &mut deferred);
        let peer = tcp.outgoing.get_mut(&Ipv4Addr::LOCALHOST).unwrap();
        assert!(peer.stream.is_some(), "connected");
        let chunk = vec![b'x'; 256 * 1024];
        let mut queued_at_most = 0;
        for _ in 0..400 {
            TcpService::write_bytes(Ipv4Addr::LOCALHOST, peer, &chunk);
            if peer.stream.is_none() {
                break;
            }
            queued_at_most = queued_at_most.max(peer.queue.len());
        }
        assert!(
            peer.stream.is_none(),
            "dropped once the queue passed its bound"
        );
        assert!(queued_at_most > 0 && queued_at_most <= MAX_PEER_QUEUE);
        assert!(peer.queue.is_empty());
        drop(peer_listener);
    }

    /// Claims come from peer routers; each is believed only as far as the registry goes (as a
    /// connect's announcement), and told only to the processes holding the listener it names.
    #[test]
    fn claims_are_announcements_made_ahead_for_one_listener() {
        let host_a = Ipv4Addr::new(192, 0, 2, 1);
        let host_c = Ipv4Addr::new(192, 0, 2, 3);
        let here = Ipv4Addr::LOCALHOST;
        let client = Ipv4Addr::new(10, 32, 0, 2);
        let server = Ipv4Addr::new(10, 32, 0, 4);
        let other = Ipv4Addr::new(10, 32, 0, 5);
        let stranger = Ipv4Addr::new(10, 32, 0, 9);
        let entry = |ip, tenant: &str, host_ip| freeflow_proto::control::OverlayEntry {
            ip,
            tenant: tenant.into(),
            host_ip,
        };
        let mut tcp = TcpService::default();
        tcp.set_network(NetworkView {
            host_ip: here,
            peer_port: 0,
            hosts: Vec::new(),
            overlay: vec![
                entry(client, "blue", host_a),
                entry(server, "blue", here),
                entry(other, "blue", here),
                entry(stranger, "red", here),
            ],
        });
        // Listeners on host ports 5001 (server, process 1), 5002 (other, 2), 5003 (stranger, 3).
        for (ip, owner) in [(server, 1u32), (other, 2), (stranger, 3)] {
            let socket = sys::tcp_socket(false).unwrap();
            tcp.local.insert(
                (ip, 80),
                LocalListener {
                    owners: vec![owner],
                    orphaned_at: None,
                    host_port: 5000 + owner as u16,
                    reuseport: false,
                    socket: Untrusted::new(socket),
                    overlay: None,
                },
            );
        }
        let claim = |host, ip, to_port, ports: &[u16], fresh| PeerMsg::Claim {
            host,
            ip,
            to_port,
            ports: ports.to_vec(),
            fresh,
        };
        tcp.apply(host_a, claim(host_a, client, 5001, &[40001, 40002], true));
        let told: Vec<(u32, SockNotice)> = std::mem::take(&mut tcp.notices);
        assert_eq!(told.len(), 2, "{told:?}");
        assert!(told.iter().all(|(owner, n)| *owner == 1
            && n.ip == client
            && n.host_ip == host_a
            && n.port == n.host_port));
        assert_eq!(
            tcp.lookup_announcement((host_a, 40001), server),
            Some((client, 40001))
        );
        // Only the listener it names: not another of the tenant, not another tenant's.
        assert_eq!(tcp.lookup_announcement((host_a, 40001), other), None);
        assert_eq!(tcp.lookup_announcement((host_a, 40001), stranger), None);
        // Said again (a refresh): nothing new to tell; newly bound again: told again.
        tcp.apply(host_a, claim(host_a, client, 5001, &[40001], false));
        assert!(tcp.notices.is_empty());
        tcp.apply(host_a, claim(host_a, client, 5001, &[40001], true));
        assert_eq!(tcp.notices.len(), 1);
        tcp.notices.clear();
        // A router speaks only for its own host, and for containers the registry puts there.
        tcp.apply(host_c, claim(host_a, client, 5001, &[40003], true));
        assert_eq!(tcp.lookup_announcement((host_a, 40003), server), None);
        tcp.apply(host_a, claim(host_a, server, 5001, &[40004], true));
        assert_eq!(tcp.lookup_announcement((host_a, 40004), server), None);
        assert!(tcp.notices.is_empty(), "{:?}", tcp.notices);
        let many: Vec<u16> = (41000..41000 + MAX_CLAIM_PORTS as u16 + 1).collect();
        tcp.apply(host_a, claim(host_a, client, 5001, &many, true));
        assert_eq!(tcp.lookup_announcement((host_a, 41000), server), None);
        // Given back: forgotten here and by the processes told.
        tcp.apply(
            host_a,
            PeerMsg::Release {
                host: host_a,
                ip: client,
                to_port: 5001,
                ports: vec![40002],
            },
        );
        assert_eq!(tcp.lookup_announcement((host_a, 40002), server), None);
        assert_eq!(
            std::mem::take(&mut tcp.notices),
            vec![(1, SockNotice::forget((host_a, 40002)))]
        );
        // A connect's announcement is taken back the same way when the connect failed.
        tcp.apply(
            host_a,
            PeerMsg::Conn {
                host: host_a,
                host_port: 40010,
                ip: client,
                port: 40010,
                to_port: Some(5001),
            },
        );
        assert_eq!(
            tcp.lookup_announcement((host_a, 40010), server),
            Some((client, 40010))
        );
        tcp.notices.clear();
        tcp.apply(
            host_a,
            PeerMsg::Release {
                host: host_a,
                ip: client,
                to_port: 5001,
                ports: vec![40010],
            },
        );
        assert_eq!(tcp.lookup_announcement((host_a, 40010), server), None);
        assert_eq!(
            std::mem::take(&mut tcp.notices),
            vec![(1, SockNotice::forget((host_a, 40010)))]
        );
        // The claiming router's connection ended: its unused ports are free on its host now.
        tcp.forget_claims_of(host_a);
        assert_eq!(tcp.lookup_announcement((host_a, 40001), server), None);
        assert!(tcp
            .notices
            .contains(&(1, SockNotice::forget((host_a, 40001)))));
        assert!(tcp
            .notices
            .iter()
            .all(|(owner, n)| *owner == 1 && n.ip.is_unspecified()));
    }
}
