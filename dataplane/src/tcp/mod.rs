//! TCP mode in the router: the setup half. A container's `libfsocket.so` asks, over its attach
//! connection, to connect to or listen on an overlay address; the router answers with a
//! host-network socket that the shim puts under the application's fd. After that the bytes flow
//! on the host network and never touch the router.
//!
//! - listen ([`listen`]): a host socket listening on an ephemeral port of this host's address.
//!   The router keeps a duplicate so the port cannot be reused by someone else while the
//!   listener is registered, and tells every peer router "overlay ip:port is at host:port".
//! - connect ([`connect`]): only to registered overlay addresses of the caller's tenant that
//!   have an accelerated listener; the router binds a host socket ([`ports`]), tells the
//!   destination's router which overlay address this host port stands for, starts a
//!   non-blocking connect and hands the connecting socket over, so EINPROGRESS, SO_ERROR and
//!   ECONNREFUSED are the kernel's own. Connects to another host's listener take sockets whose
//!   ports were announced ahead ([`claims`]). Anything else gets "fall back": the shim connects
//!   over the overlay as without Freeflow.
//! - resolve ([`resolve`]): an accepted connection's host peer address back to the overlay
//!   address the client's router announced; unknown peers (someone on the host network who was
//!   never announced) are refused, so a listener sees only connections made through Freeflow.
//!   Clients that reach the overlay listener without Freeflow are relayed ([`relay`]).
//!
//! Router-to-router messages ([`freeflow_proto::peer`], JSON lines on TCP to each host's peer
//! port, [`peers`]) carry listener tables and connection announcements. Peers are accepted only
//! from registered host addresses.
//!
//! Addresses are [`OverlayEndpoint`]s or [`HostEndpoint`](endpoint::HostEndpoint)s, never one
//! for the other ([`endpoint`]); what the daemon says of the cluster is in [`registry`], and the
//! descriptors a container passes are checked in [`passed`].

mod claims;
mod connect;
mod dispatch;
mod endpoint;
mod listen;
mod passed;
mod peers;
mod ports;
mod registry;
mod relay;
mod resolve;
#[cfg(test)]
mod tests;

use crate::sys::Untrusted;
use claims::Claims;
pub use connect::{ConnectJob, Setup};
pub use dispatch::{SetupReturn, SetupReturns, ShardConnect, ShardConnected};
use endpoint::OverlayEndpoint;
use freeflow_proto::control::{ContainerEntry, NetworkView};
use freeflow_proto::sockmsg::{SockNotice, SockOp, SockReply, SockRequest, SockStatus, FLAG_INET6};
use listen::Listeners;
use peers::Peers;
use ports::HostPorts;
use registry::Registry;
use relay::Relays;
use resolve::Announcements;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::time::Instant;

/// The caller of a request, as the attach check established it.
pub struct Caller<'a> {
    pub attachment: u32,
    pub container: &'a ContainerEntry,
}

/// Replies that became ready outside a request (resolves whose announcement arrived or timed out).
pub type Deferred = Vec<(u32, SockReply)>;

/// A reply, and the socket to pass with it.
type Reply = (SockReply, Option<OwnedFd>);

/// What the service did, for `status`: host totals, and per tenant (of the connecting
/// container, or of the listener's for a relayed client).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counters {
    /// Connects accelerated (a host socket handed over).
    pub connects: u64,
    /// Requests answered "fall back" (the shim uses the overlay).
    pub fallbacks: u64,
    /// Clients without Freeflow handed to an application's accept.
    pub relayed: u64,
    /// Connects from a claimed socket.
    pub claimed: u64,
    /// Per tenant: connects, fallbacks, relayed (bounded by the tenants ever registered).
    pub by_tenant: std::collections::BTreeMap<String, TenantCounters>,
}

/// One tenant's share of [`Counters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TenantCounters {
    pub connects: u64,
    pub fallbacks: u64,
    pub relayed: u64,
}

impl Counters {
    /// `tenant`'s counters, created at zero on first use (a connect is no fast path).
    fn tenant(&mut self, tenant: &str) -> &mut TenantCounters {
        if !self.by_tenant.contains_key(tenant) {
            self.by_tenant
                .insert(tenant.to_owned(), TenantCounters::default());
        }
        self.by_tenant.get_mut(tenant).expect("inserted above")
    }

    fn connected(&mut self, tenant: &str, claimed: bool) {
        self.connects += 1;
        self.claimed += u64::from(claimed);
        self.tenant(tenant).connects += 1;
    }

    /// Takes back [`Self::connected`] for a connect the kernel refused afterwards.
    fn not_connected(&mut self, tenant: &str, claimed: bool) {
        self.connects = self.connects.saturating_sub(1);
        self.claimed = self.claimed.saturating_sub(u64::from(claimed));
        let t = self.tenant(tenant);
        t.connects = t.connects.saturating_sub(1);
    }

    fn fell_back(&mut self, tenant: &str) {
        self.fallbacks += 1;
        self.tenant(tenant).fallbacks += 1;
    }

    /// A client relayed to a listener of `tenant` (`None`: its container is no longer in the
    /// table; only the total counts it).
    fn relayed_to(&mut self, tenant: Option<&str>) {
        self.relayed += 1;
        if let Some(tenant) = tenant {
            self.tenant(tenant).relayed += 1;
        }
    }
}

#[derive(Default)]
pub struct TcpService {
    /// rdma_cm steps peers sent, for the connection manager (crate::cm), with their host.
    pub cm_inbox: Vec<(std::net::Ipv4Addr, freeflow_proto::peer::CmPeerMsg)>,
    registry: Registry,
    listeners: Listeners,
    announcements: Announcements,
    relays: Relays,
    claims: Claims,
    ports: HostPorts,
    peers: Peers,
    /// Notices for the listeners' processes, for the control loop to send.
    pub notices: Vec<(u32, SockNotice)>,
    pub counters: Counters,
}

impl TcpService {
    /// Takes a new view of the cluster: overlay addresses, this host, peer hosts.
    pub fn set_network(&mut self, network: NetworkView) {
        let host_changed = self.registry.changes_host(&network);
        if host_changed {
            self.ports.clear_spares();
            self.claims.clear();
        }
        self.peers.set_hosts(&network, host_changed);
        let outgoing = &self.peers.outgoing;
        self.listeners
            .retain_remote(|host| outgoing.contains_key(&host));
        self.registry.set(network);
    }

    /// Serves one request to its reply (a connect's kernel work done here: see [`Self::serve`]).
    /// Returns the reply and the socket to pass with it, or `None` when the reply is deferred
    /// (a resolve waiting for its announcement). The tests' way in.
    #[cfg(test)]
    pub fn handle(
        &mut self,
        caller: Caller<'_>,
        req: SockRequest,
        passed: Vec<Untrusted>,
    ) -> Option<(SockReply, Option<OwnedFd>)> {
        match self.serve(caller, req, passed) {
            Setup::Reply(reply) => Some(reply),
            Setup::Connect(job) => Some(self.run_inline(job)),
            Setup::Deferred => None,
        }
    }

    /// Serves one request, up to a connect's kernel work, which the caller runs where it
    /// chooses ([`ConnectJob::run`] on a shard, or [`Self::run_inline`]).
    /// `passed` are the descriptors that came with the request (a Listen carries at most one, a
    /// Relisten two; the control thread refuses others).
    pub fn serve(&mut self, caller: Caller<'_>, req: SockRequest, passed: Vec<Untrusted>) -> Setup {
        let Some(host_ip) = self.registry.host_ip() else {
            // A router without a network view (run alone) accelerates nothing.
            return Setup::Reply((SockReply::fallback(req.seq), None));
        };
        let v6 = req.flags & FLAG_INET6 != 0;
        let reply = match req.op {
            SockOp::Connect => return self.connect(caller, req, host_ip, v6),
            SockOp::Resolve => {
                return match self.resolve(caller, req) {
                    Some(reply) => Setup::Reply(reply),
                    None => Setup::Deferred,
                }
            }
            SockOp::Own => return Setup::Reply(self.own(caller, req)),
            SockOp::Accepts => return Setup::Reply(self.accepts(caller, req)),
            SockOp::Listen => self.listen(caller, req, host_ip, v6, passed.into_iter().next()),
            SockOp::Relisten => self.relisten(caller, req, host_ip, passed),
            SockOp::Unlisten => self.unlisten(caller, req),
        };
        // An overlay listener let go of (or replaced) is closed before the answer: the
        // container may bind its port again as soon as its close() returns.
        self.unwatch_gone_overlays();
        Setup::Reply(reply)
    }

    /// Forgets everything an attachment registered (its process went away).
    /// Listeners it held alone stay for the orphan grace, for a forked child to claim (without
    /// their overlay listeners: the port is free in the container at once).
    pub fn detach(&mut self, attachment: u32) {
        self.listeners.detach(attachment, Instant::now());
        self.unwatch_gone_overlays();
        self.announcements.drop_pending_of(attachment);
    }

    /// Descriptors the control loop must poll for the peer channel.
    pub fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, i16)> {
        self.peer_poll_fds()
    }

    /// Milliseconds until the service needs a tick (pending resolves, peer retries), if ever.
    pub fn next_timeout_ms(&self, now: Instant) -> Option<i32> {
        let resolve = self
            .announcements
            .next_deadline()
            .into_iter()
            .chain(self.listeners.next_orphan_deadline())
            .min();
        let retry = self.next_peer_deadline();
        let relay = self.relays.next_deadline();
        [resolve, retry, relay]
            .into_iter()
            .flatten()
            .min()
            .map(|t| t.saturating_duration_since(now).as_millis() as i32 + 1)
    }

    /// Handles readiness on `fd` (one of `poll_fds`), answering resolves that can now be
    /// answered.
    pub fn on_ready(&mut self, fd: RawFd, revents: i16, deferred: &mut Deferred) {
        if !self.on_peer_ready(fd, revents, deferred) {
            self.relay_later(fd);
        }
    }

    /// Work at the end of each turn of the control loop: take the clients without Freeflow
    /// that came, expire resolves and old announcements, reconnect lost peers, make spare
    /// sockets.
    pub fn tick(&mut self, deferred: &mut Deferred) {
        // After the turn's requests: clients without Freeflow that came meanwhile.
        self.relay_readable();
        let now = Instant::now();
        self.relay_grace_over(now);
        if let Some(host_ip) = self.registry.host_ip() {
            self.ports.refill_spares(host_ip);
            self.refill_pools(host_ip, now);
        }
        self.answer_pending(deferred, now);
        self.announcements.expire(now);
        let local = &self.listeners.local;
        let answered = self
            .relays
            .expire(now, |listener| local.contains_key(&listener));
        for (listener, count) in answered {
            self.count_relayed(listener, count);
        }
        if self.listeners.expire_orphans(now) {
            self.broadcast_listeners();
        }
        self.reconnect_peers(now);
    }

    /// Sends an rdma_cm step to `host`'s router (dropped if `host` is not a registered peer).
    pub fn send_cm(&mut self, host: std::net::Ipv4Addr, msg: freeflow_proto::peer::CmPeerMsg) {
        let Some(own) = self.registry.host_ip() else {
            return;
        };
        self.send_to(host, &freeflow_proto::peer::PeerMsg::Cm { host: own, msg });
    }

    pub fn listeners(&self) -> usize {
        self.listeners.local.len()
    }

    /// The other hosts' listeners this router knows, as overlay `ip:port`, sorted.
    pub fn remote_listeners(&self) -> Vec<String> {
        self.listeners.remote_overlay_addresses()
    }

    /// Whether our connection to `host`'s router is up (the connection manager ends its
    /// connections with that host when it goes down).
    pub fn peer_up(&self, host: std::net::Ipv4Addr) -> bool {
        self.peers.is_up(host)
    }
}

/// A success reply naming overlay address `addr`.
fn ok(seq: u32, addr: OverlayEndpoint) -> SockReply {
    SockReply {
        status: SockStatus::Ok,
        seq,
        errno: 0,
        ip: addr.ip(),
        port: addr.port(),
    }
}

/// The error reply for `e` (EIO if it carries no errno).
fn errno_reply(seq: u32, e: &io::Error) -> SockReply {
    SockReply::error(seq, e.raw_os_error().unwrap_or(libc::EIO))
}
