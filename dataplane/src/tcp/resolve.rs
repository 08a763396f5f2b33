//! Announcements and resolves: what client routers said about their connections (a host
//! address is an overlay address, connecting to a given listener), and the requests of
//! listeners' processes to resolve an accepted connection's host peer address back to it.
//! Unknown peers (someone on the host network who was never announced) are refused, so a
//! listener sees only connections made through Freeflow.

use super::claims::MAX_CLAIM_PORTS;
use super::endpoint::{HostEndpoint, OverlayEndpoint};
use super::relay::DOORBELL_SOURCE;
use super::{ok, Caller, Deferred, TcpService};
use freeflow_proto::sockmsg::{SockNotice, SockReply, SockRequest};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

/// How long a resolve waits for the client router's announcement.
const RESOLVE_WAIT: Duration = Duration::from_secs(1);
/// How long an announcement is kept (the accept that needs it comes right after the connect).
pub(super) const ANNOUNCEMENT_TTL: Duration = Duration::from_secs(120);
/// How often old announcements are looked for (they live a little longer than their TTL).
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Resolves one process may have waiting for their announcements at most: the shim has at
/// most 256 requests outstanding (`MAX_IN_FLIGHT` in shim/socket/src/session/exchange.rs), so
/// only a process that speaks the protocol itself (a hostile one) goes past it.
pub(super) const MAX_PENDING_PER_PROCESS: usize = 256;
/// Resolves waiting in all at most (each is looked at on every turn of the control loop).
pub(super) const MAX_PENDING: usize = 4096;

/// What a client's router said about one of its connections.
pub(super) struct Announced {
    /// The overlay address the connection is.
    pub client: OverlayEndpoint,
    pub at: Instant,
    pub to_port: Option<u16>,
    /// Claimed ahead (the port may still be unused): forgotten when the claiming router's
    /// connection ends, since its unused ports are then free for anyone on that host.
    pub claimed: bool,
}

impl Announced {
    /// Whether it says host port → overlay address `ip`, for the listener on host port `to_port`.
    pub fn names(&self, ip: Ipv4Addr, to_port: u16) -> bool {
        self.client.ip() == ip && self.to_port == Some(to_port)
    }
}

/// A resolve waiting for its announcement.
pub(super) struct PendingResolve {
    pub attachment: u32,
    listener_ip: Ipv4Addr,
    pub seq: u32,
    key: HostEndpoint,
    deadline: Instant,
}

#[derive(Default)]
pub(super) struct Announcements {
    /// Host address of a client -> its overlay address, when announced, and the host port of
    /// the listener it connects to.
    pub announced: HashMap<HostEndpoint, Announced>,
    pending: Vec<PendingResolve>,
    /// When old announcements are next looked for: the control loop turns once per event,
    /// and a scan of every announcement on each turn made it spin under load (tens of
    /// thousands are kept at a few thousand connects per second).
    next_sweep: Option<Instant>,
}

impl Announcements {
    /// Drops the resolves an attachment was waiting for (its process went away).
    pub fn drop_pending_of(&mut self, attachment: u32) {
        self.pending.retain(|p| p.attachment != attachment);
    }

    /// How many resolves wait for their announcements (tests).
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.pending.len()
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.iter().map(|p| p.deadline).min()
    }

    /// Forgets announcements older than [`ANNOUNCEMENT_TTL`] (looked for every
    /// [`SWEEP_EVERY`]).
    pub fn expire(&mut self, now: Instant) {
        if self.next_sweep.is_some_and(|at| now < at) {
            return;
        }
        self.announced
            .retain(|_, a| now.duration_since(a.at) < ANNOUNCEMENT_TTL);
        self.next_sweep = Some(now + SWEEP_EVERY);
    }

    /// Forgets the announcement of `key` if it says `ip` for the listener on host port
    /// `to_port`; true if it did.
    pub fn take_back(&mut self, key: HostEndpoint, ip: Ipv4Addr, to_port: u16) -> bool {
        let named = self
            .announced
            .get(&key)
            .is_some_and(|a| a.names(ip, to_port));
        if named {
            self.announced.remove(&key);
        }
        named
    }
}

impl TcpService {
    /// Serves a Resolve of host address `req.ip:req.port`: a doorbell (the reply passes the
    /// overlay listener to accept the client from), an announced client, or `None` (the reply
    /// is deferred until the announcement comes or the wait is over).
    pub(super) fn resolve(
        &mut self,
        caller: Caller<'_>,
        req: SockRequest,
    ) -> Option<(SockReply, Option<OwnedFd>)> {
        let key = HostEndpoint::new(req.ip, req.port);
        if key.ip() == DOORBELL_SOURCE {
            return Some(self.resolve_doorbell(key, caller.container.ip, req.seq));
        }
        match self.lookup_announcement(key, caller.container.ip) {
            Some(client) => Some((ok(req.seq, client), None)),
            None => {
                // Bounded: a resolve past either bound is refused at once, as one that waited
                // its whole time without an announcement would be (the shim then drops the
                // connection as unannounced). Those already waiting keep their turn.
                let pending = &self.announcements.pending;
                let of_caller = pending
                    .iter()
                    .filter(|p| p.attachment == caller.attachment)
                    .count();
                if of_caller >= MAX_PENDING_PER_PROCESS || pending.len() >= MAX_PENDING {
                    log::warn!(
                        target: "tcp resolves refused",
                        "tcp: container {}: resolve refused, {} waiting ({of_caller} of its \
                         process)",
                        caller.container.name,
                        pending.len()
                    );
                    return Some((SockReply::error(req.seq, libc::ECONNREFUSED), None));
                }
                self.announcements.pending.push(PendingResolve {
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

    /// The overlay address announced for host address `key`, for a listener of container
    /// `listener_ip`: only if the registry places that overlay address on the announcing host,
    /// in the listener's tenant, and the announcement names one of that container's listeners
    /// (no container learns about connections to another).
    pub(super) fn lookup_announcement(
        &self,
        key: HostEndpoint,
        listener_ip: Ipv4Addr,
    ) -> Option<OverlayEndpoint> {
        let a = self.announcements.announced.get(&key)?;
        let client = self.registry.placement(a.client.ip())?;
        let listener = self.registry.placement(listener_ip)?;
        // A claim names no listener: any of the container's will do.
        let targets_listener = self.listeners.serves(listener_ip, a.to_port);
        (client.host == key.ip() && client.tenant == listener.tenant && targets_listener)
            .then_some(a.client)
    }

    /// Answers the resolves whose announcement came, and refuses those that waited too long.
    pub(super) fn answer_pending(&mut self, deferred: &mut Deferred, now: Instant) {
        let mut still = Vec::new();
        for p in std::mem::take(&mut self.announcements.pending) {
            if let Some(client) = self.lookup_announcement(p.key, p.listener_ip) {
                deferred.push((p.attachment, ok(p.seq, client)));
            } else if now >= p.deadline {
                deferred.push((p.attachment, SockReply::error(p.seq, libc::ECONNREFUSED)));
            } else {
                still.push(p);
            }
        }
        self.announcements.pending = still;
    }

    /// A peer's announcement of a connection (`PeerMsg::Conn`): checked against the registry
    /// when a resolve or a notice uses it.
    pub(super) fn record_conn(
        &mut self,
        from: HostEndpoint,
        client: OverlayEndpoint,
        to_port: Option<u16>,
    ) {
        let announced = Announced {
            client,
            at: Instant::now(),
            to_port,
            claimed: false,
        };
        self.announcements.announced.insert(from, announced);
        if let Some(to_port) = to_port {
            self.notify(to_port, from);
        }
    }

    /// A peer's claim (`PeerMsg::Claim`) of host ports `ports` of `host` for connects of
    /// overlay address `ip` to the listener on host port `to_port`.
    pub(super) fn record_claim(
        &mut self,
        host: Ipv4Addr,
        ip: Ipv4Addr,
        to_port: u16,
        ports: Vec<u16>,
        fresh: bool,
    ) {
        if ports.len() > MAX_CLAIM_PORTS {
            log::warn!("tcp: peer {host} claimed too many ports at once");
            return;
        }
        let now = Instant::now();
        for port in ports {
            let key = HostEndpoint::new(host, port);
            // Said again: the processes were told (and may have used it up).
            let known = self
                .announcements
                .announced
                .get(&key)
                .is_some_and(|a| a.claimed && a.names(ip, to_port));
            // Checked against the registry when a resolve or a notice uses it, as a
            // connect's announcement.
            let announced = Announced {
                client: OverlayEndpoint::new(ip, port),
                at: now,
                to_port: Some(to_port),
                claimed: true,
            };
            self.announcements.announced.insert(key, announced);
            if fresh || !known {
                self.notify(to_port, key);
            }
        }
    }

    /// A peer's release (`PeerMsg::Release`): the ports it names are forgotten, here and by
    /// the listener's processes.
    pub(super) fn record_release(
        &mut self,
        host: Ipv4Addr,
        ip: Ipv4Addr,
        to_port: u16,
        ports: Vec<u16>,
    ) {
        for port in ports.into_iter().take(MAX_CLAIM_PORTS) {
            let key = HostEndpoint::new(host, port);
            if self.announcements.take_back(key, ip, to_port) {
                self.tell_listener(to_port, SockNotice::forget(key.into()));
            }
        }
    }

    /// Takes back what `host`'s router claimed (its connection to us ended: its unused ports
    /// are free for anyone on that host now), here and in the listeners' processes.
    pub(super) fn forget_claims_of(&mut self, host: Ipv4Addr) {
        let gone: Vec<(HostEndpoint, Option<u16>)> = self
            .announcements
            .announced
            .iter()
            .filter(|(key, a)| key.ip() == host && a.claimed)
            .map(|(key, a)| (*key, a.to_port))
            .collect();
        for (key, to_port) in gone {
            self.announcements.announced.remove(&key);
            if let Some(to_port) = to_port {
                self.tell_listener(to_port, SockNotice::forget(key.into()));
            }
        }
    }
}
