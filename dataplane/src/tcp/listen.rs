//! Accelerated listeners: this host's (a host socket listening on an ephemeral port of this
//! host's address, registered for an overlay address) and the other hosts' tables, as their
//! routers sent them. The router keeps a duplicate of each local listener so the port cannot
//! be reused by someone else while the listener is registered, and tells every peer router
//! "overlay ip:port is at host:port".

use super::endpoint::{HostEndpoint, OverlayEndpoint};
use super::passed::{host_listener_ok, overlay_listener_ok, v6_only};
use super::{errno_reply, ok, Caller, Reply, TcpService};
use crate::sys::{self, Untrusted};
use freeflow_proto::peer::{ListenerEntry, PeerMsg};
use freeflow_proto::sockmsg::{SockNotice, SockReply, SockRequest, FLAG_ORPHAN, FLAG_REUSEPORT};
use std::collections::{HashMap, HashSet};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

/// How long a listener outlives its last known holder: a forked child that inherited it (a
/// daemonizing server, a pre-fork server whose parent exits) claims it within this time.
const ORPHAN_GRACE: Duration = Duration::from_secs(2);
/// Accelerated listeners one container may have (more listen unaccelerated, on the overlay).
const MAX_LISTENERS_PER_CONTAINER: usize = 256;

pub(super) struct LocalListener {
    /// Attachments (processes) holding the listener; it is kept while any is alive.
    pub owners: Vec<u32>,
    /// Holders that take the clients without Freeflow themselves (their accept waits on the
    /// overlay listener too: `Accepts`): while any is alive, the router rings a doorbell only
    /// for clients that wait past a grace ([`super::relay`]).
    pub accepting: Vec<u32>,
    /// Since when no holder is known.
    pub orphaned_at: Option<Instant>,
    pub host_port: u16,
    /// The backlog the application asked for (0: the kernel's default, or unknown): it bounds
    /// the clients without Freeflow waiting for its accept in the router too.
    pub backlog: u32,
    /// Created for an application socket with SO_REUSEPORT: other processes of the container
    /// asking for the same port with SO_REUSEPORT share it.
    pub reuseport: bool,
    /// Keeps the socket (and its port) alive while registered. The container holds it too.
    pub socket: Untrusted,
    /// The application's own socket, listening on the overlay address in the container, for
    /// clients that come without Freeflow (not accelerated; relayed once, at accept).
    pub overlay: Option<Untrusted>,
}

impl LocalListener {
    /// No known holder any more: kept for the orphan grace (a forked child may claim it), but
    /// its overlay socket goes at once, so that the port is free in the container for a server
    /// that restarts (clients without Freeflow are refused meanwhile). A forked child claims
    /// its listeners before it closes the session it inherited, so a parent that exits leaves
    /// no listener without a holder.
    fn orphan(&mut self, now: Instant) {
        self.orphaned_at = Some(now);
        if let Some(overlay) = self.overlay.take() {
            overlay.close_if_listening();
        }
    }

    fn add_owner(&mut self, attachment: u32) {
        if !self.owners.contains(&attachment) {
            self.owners.push(attachment);
        }
    }
}

impl Drop for LocalListener {
    /// The overlay listener is closed before the router answers the request that let go of it
    /// (not on the closer thread): a container that closes its listener and binds the port
    /// again at once (SO_REUSEADDR) must find the port free.
    fn drop(&mut self) {
        if let Some(overlay) = self.overlay.take() {
            overlay.close_if_listening();
        }
    }
}

#[derive(Default)]
pub(super) struct Listeners {
    /// This host's listeners by overlay address.
    pub local: HashMap<OverlayEndpoint, LocalListener>,
    /// Listeners of other hosts: (host, overlay address) -> host port.
    remote: HashMap<(Ipv4Addr, OverlayEndpoint), u16>,
}

impl Listeners {
    /// The local listener on host port `host_port`.
    pub fn by_host_port(&self, host_port: u16) -> Option<(OverlayEndpoint, &LocalListener)> {
        self.local
            .iter()
            .find(|(_, l)| l.host_port == host_port)
            .map(|(&key, l)| (key, l))
    }

    fn listeners_of(&self, container_ip: Ipv4Addr) -> usize {
        self.local
            .keys()
            .filter(|key| key.ip() == container_ip)
            .count()
    }

    /// Whether container `listener_ip` has a local listener on host port `to_port` (any of its
    /// listeners when `None`).
    pub fn serves(&self, listener_ip: Ipv4Addr, to_port: Option<u16>) -> bool {
        self.local
            .iter()
            .any(|(key, l)| key.ip() == listener_ip && to_port.is_none_or(|to| l.host_port == to))
    }

    /// The listener table peers are sent: this host's listeners, in order.
    pub fn table(&self, host: Ipv4Addr) -> PeerMsg {
        let mut entries: Vec<ListenerEntry> = self
            .local
            .iter()
            .map(|(key, l)| ListenerEntry {
                ip: key.ip(),
                port: key.port(),
                host_port: l.host_port,
            })
            .collect();
        entries.sort_by_key(|e| (e.ip, e.port));
        PeerMsg::Listeners { host, entries }
    }

    /// Forgets an attachment's holds; listeners it held alone become orphans.
    pub fn detach(&mut self, attachment: u32, now: Instant) {
        for l in self.local.values_mut() {
            let before = l.owners.len();
            l.owners.retain(|&a| a != attachment);
            l.accepting.retain(|&a| a != attachment);
            if before > 0 && l.owners.is_empty() {
                l.orphan(now);
            }
        }
    }

    /// Drops the orphans whose grace is over; true if any went.
    pub fn expire_orphans(&mut self, now: Instant) -> bool {
        let before = self.local.len();
        self.local.retain(|_, l| {
            l.orphaned_at
                .is_none_or(|at| now.duration_since(at) < ORPHAN_GRACE)
        });
        self.local.len() != before
    }

    /// When the next orphan's grace ends.
    pub fn next_orphan_deadline(&self) -> Option<Instant> {
        self.local
            .values()
            .filter_map(|l| l.orphaned_at.map(|at| at + ORPHAN_GRACE))
            .min()
    }

    /// Stops taking clients on a listener's overlay socket (closed off the control thread).
    pub fn give_up_overlay(&mut self, key: OverlayEndpoint) {
        if let Some(l) = self.local.get_mut(&key) {
            l.overlay = None;
        }
    }

    /// Where overlay address `dst` of host `host` listens, per that host's table.
    pub fn remote(&self, host: Ipv4Addr, dst: OverlayEndpoint) -> Option<HostEndpoint> {
        let host_port = *self.remote.get(&(host, dst))?;
        Some(HostEndpoint::new(host, host_port))
    }

    /// The host listeners of other hosts (host address and port).
    pub fn remote_overlay_addresses(&self) -> Vec<String> {
        let mut known: Vec<OverlayEndpoint> = self.remote.keys().map(|&(_, dst)| dst).collect();
        known.sort_by_key(|e| (e.ip(), e.port()));
        known.dedup();
        known
            .iter()
            .map(|e| format!("{}:{}", e.ip(), e.port()))
            .collect()
    }

    pub fn remote_host_ports(&self) -> HashSet<(Ipv4Addr, u16)> {
        self.remote
            .iter()
            .map(|(&(host, _), &port)| (host, port))
            .collect()
    }

    /// Replaces `host`'s table. Stored as the peer said it, attributed to the peer; whether the
    /// registry places an address on that host is checked when a connect uses the entry (the
    /// peer's table may arrive before our daemon has pushed us the container).
    pub fn set_remote(&mut self, host: Ipv4Addr, entries: Vec<ListenerEntry>) {
        self.forget_remote(host);
        for e in entries {
            let key = (host, OverlayEndpoint::new(e.ip, e.port));
            self.remote.insert(key, e.host_port);
        }
    }

    pub fn forget_remote(&mut self, host: Ipv4Addr) {
        self.remote.retain(|&(h, _), _| h != host);
    }

    /// Keeps the tables of the hosts for which `keep` holds.
    pub fn retain_remote(&mut self, keep: impl Fn(Ipv4Addr) -> bool) {
        self.remote.retain(|&(host, _), _| keep(host));
    }

    /// A Listen for `key` that an existing listener answers: a socket shared under
    /// SO_REUSEPORT, or the port is in use. `None`: a listener is to be made.
    fn answer_existing(
        &mut self,
        key: OverlayEndpoint,
        attachment: u32,
        reuseport: bool,
        seq: u32,
    ) -> Option<Reply> {
        let existing = self.local.get_mut(&key)?;
        let live = existing.orphaned_at.is_none();
        if live && reuseport && existing.reuseport {
            // SO_REUSEPORT on both: one more socket serves the port, in this process or
            // another of the container; it shares the host listener (the overlay socket it
            // passed is not needed: the first one already takes clients that come without
            // Freeflow).
            return Some(match existing.socket.try_clone() {
                Ok(shared) => {
                    existing.add_owner(attachment);
                    (ok(seq, key), Some(shared))
                }
                Err(e) => (errno_reply(seq, &e), None),
            });
        }
        if live && !existing.owners.contains(&attachment) {
            return Some((SockReply::error(seq, libc::EADDRINUSE), None));
        }
        None
    }
}

impl TcpService {
    pub(super) fn listen(
        &mut self,
        caller: Caller<'_>,
        req: SockRequest,
        host_ip: Ipv4Addr,
        v6: bool,
        passed: Option<Untrusted>,
    ) -> Reply {
        let ip = caller.container.ip;
        if req.ip != Ipv4Addr::UNSPECIFIED && req.ip != ip {
            return (SockReply::fallback(req.seq), None);
        }
        // A v6-only listener is the kernel's (it never takes the overlay's IPv4 clients), and
        // must not displace an AF_INET listener on the same port.
        if passed.as_ref().is_some_and(v6_only) {
            return (SockReply::fallback(req.seq), None);
        }
        let key = OverlayEndpoint::new(ip, req.port);
        let reuseport = req.flags & FLAG_REUSEPORT != 0;
        if let Some(answer) =
            self.listeners
                .answer_existing(key, caller.attachment, reuseport, req.seq)
        {
            return answer;
        }
        if !self.listeners.local.contains_key(&key)
            && self.listeners.listeners_of(ip) >= MAX_LISTENERS_PER_CONTAINER
        {
            // Past the cap the container still listens, unaccelerated: the shim keeps the
            // kernel's listener in the container, which clients reach over the overlay (a
            // connect to it finds no accelerated listener and falls back too).
            return (SockReply::fallback(req.seq), None);
        }
        let overlay = passed.and_then(|fd| match overlay_listener_ok(&fd, req.port) {
            Ok(()) => Some(fd),
            Err(why) => {
                log::warn!(
                    "tcp: container {} passed an unusable overlay listener for port {}: {why}",
                    caller.container.name,
                    req.port
                );
                None
            }
        });
        let backlog = req.backlog.min(i32::MAX as u32) as i32;
        match host_listener(host_ip, v6, backlog) {
            Ok((socket, keep, host_port)) => {
                let listener = LocalListener {
                    owners: vec![caller.attachment],
                    accepting: Vec::new(),
                    orphaned_at: None,
                    host_port,
                    backlog: req.backlog,
                    reuseport,
                    socket: Untrusted::new(keep),
                    overlay,
                };
                self.listeners.local.insert(key, listener);
                self.broadcast_listeners();
                (ok(req.seq, key), Some(socket))
            }
            Err(e) => (errno_reply(req.seq, &e), None),
        }
    }

    /// A process that held an accelerated listener before this router started hands it back,
    /// with a new overlay listener. Checked like everything from a container: the first must be
    /// a TCP listener on this host's address (a container only has those from a router), the
    /// second a listener on the overlay port.
    pub(super) fn relisten(
        &mut self,
        caller: Caller<'_>,
        req: SockRequest,
        host_ip: Ipv4Addr,
        passed: Vec<Untrusted>,
    ) -> Reply {
        let key = OverlayEndpoint::new(caller.container.ip, req.port);
        let mut fds = passed.into_iter();
        let (Some(host), overlay) = (fds.next(), fds.next()) else {
            return (SockReply::error(req.seq, libc::EINVAL), None);
        };
        let host_port = match host_listener_ok(&host, host_ip) {
            Ok(port) => {
                crate::jail::mark_handed_back_listener(&host.as_fd());
                port
            }
            Err(why) => {
                log::warn!(
                    "tcp: container {} handed back an unusable listener for port {}: {why}",
                    caller.container.name,
                    req.port
                );
                return (SockReply::error(req.seq, libc::EINVAL), None);
            }
        };
        let overlay = overlay.filter(|fd| overlay_listener_ok(fd, req.port).is_ok());
        if let Some(existing) = self.listeners.local.get_mut(&key) {
            // Another holder of the same listener came first (forked processes).
            if existing.host_port != host_port {
                return (SockReply::error(req.seq, libc::EADDRINUSE), None);
            }
            existing.add_owner(caller.attachment);
            existing.orphaned_at = None;
            if existing.overlay.is_none() {
                // The first holder's was unusable, or given up since (the holders of one
                // overlay listener take it back from a router that is gone, and listen on
                // it again, each in its own time).
                existing.overlay = overlay;
            }
            return (ok(req.seq, key), None);
        }
        // A host port is one listener's: a container handing back a socket bound to another
        // listener's port (its own, under another overlay port) gets nothing.
        if self.listeners.by_host_port(host_port).is_some()
            || self.listeners.listeners_of(key.ip()) >= MAX_LISTENERS_PER_CONTAINER
        {
            return (SockReply::error(req.seq, libc::EADDRINUSE), None);
        }
        let listener = LocalListener {
            owners: vec![caller.attachment],
            accepting: Vec::new(),
            orphaned_at: None,
            host_port,
            backlog: req.backlog,
            reuseport: req.flags & FLAG_REUSEPORT != 0,
            socket: host,
            overlay,
        };
        self.listeners.local.insert(key, listener);
        self.broadcast_listeners();
        (ok(req.seq, key), None)
    }

    /// One holder let go; the listener goes when the last one does (forked children and
    /// SO_REUSEPORT peers may still serve it).
    pub(super) fn unlisten(&mut self, caller: Caller<'_>, req: SockRequest) -> Reply {
        let key = OverlayEndpoint::new(caller.container.ip, req.port);
        if let Some(l) = self.listeners.local.get_mut(&key) {
            let held = !l.owners.is_empty();
            l.owners.retain(|&a| a != caller.attachment);
            l.accepting.retain(|&a| a != caller.attachment);
            if held && l.owners.is_empty() {
                if req.flags & FLAG_ORPHAN != 0 {
                    l.orphan(Instant::now());
                } else {
                    self.listeners.local.remove(&key);
                    self.broadcast_listeners();
                }
            }
        }
        (ok(req.seq, key), None)
    }

    /// One more process holds the listener (a forked child said so).
    pub(super) fn own(&mut self, caller: Caller<'_>, req: SockRequest) -> Reply {
        let key = OverlayEndpoint::new(caller.container.ip, req.port);
        match self.listeners.local.get_mut(&key) {
            Some(l) => {
                l.add_owner(caller.attachment);
                l.orphaned_at = None;
                (ok(req.seq, key), None)
            }
            None => (SockReply::error(req.seq, libc::ENOENT), None),
        }
    }

    /// A holder of the listener takes its clients without Freeflow itself (`Accepts`). Only a
    /// process that holds the listener counts (at most once): a container cannot make the
    /// router hold more than its processes' holds.
    pub(super) fn accepts(&mut self, caller: Caller<'_>, req: SockRequest) -> Reply {
        let key = OverlayEndpoint::new(caller.container.ip, req.port);
        match self.listeners.local.get_mut(&key) {
            Some(l) if l.owners.contains(&caller.attachment) => {
                if !l.accepting.contains(&caller.attachment) {
                    l.accepting.push(caller.attachment);
                }
                (ok(req.seq, key), None)
            }
            _ => (SockReply::error(req.seq, libc::ENOENT), None),
        }
    }

    /// Queues a notice for every process holding the local listener on host port `to_port`:
    /// the connection from host address `from` is the overlay address announced for it.
    pub(super) fn notify(&mut self, to_port: u16, from: HostEndpoint) {
        let Some((listener, l)) = self.listeners.by_host_port(to_port) else {
            return;
        };
        let owners = l.owners.clone();
        let Some(client) = self.lookup_announcement(from, listener.ip()) else {
            return;
        };
        let notice = SockNotice {
            host_ip: from.ip(),
            host_port: from.port(),
            ip: client.ip(),
            port: client.port(),
            sent_ms: 0,
        };
        self.notices
            .extend(owners.into_iter().map(|owner| (owner, notice)));
    }

    /// Queues `notice` for every process holding the local listener on host port `to_port`.
    pub(super) fn tell_listener(&mut self, to_port: u16, notice: SockNotice) {
        if let Some((_, l)) = self.listeners.by_host_port(to_port) {
            self.notices
                .extend(l.owners.iter().map(|&owner| (owner, notice)));
        }
    }
}

/// A host socket listening on a port of `host_ip` the kernel chose, a duplicate for the router
/// to keep, and the port.
fn host_listener(host_ip: Ipv4Addr, v6: bool, backlog: i32) -> io::Result<(OwnedFd, OwnedFd, u16)> {
    let socket = sys::tcp_socket(v6)?;
    sys::set_reuseaddr(&socket)?;
    sys::bind(&socket, host_ip, 0, v6)?;
    sys::listen(&socket, backlog)?;
    crate::jail::mark_listener(&socket);
    let host_port = sys::local_port(&socket)?;
    let keep = socket.try_clone()?;
    Ok((socket, keep, host_port))
}
