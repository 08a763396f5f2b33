//! Connect: only to registered overlay addresses of the caller's tenant that have an
//! accelerated listener; the router binds a host socket, tells the destination's router which
//! overlay address this host port stands for, starts a non-blocking connect and hands the
//! connecting socket over, so EINPROGRESS, SO_ERROR and ECONNREFUSED are the kernel's own.
//! Anything else gets "fall back": the shim connects over the overlay as without Freeflow.
//! A socket handed over carries the jail's connection mark (see `crate::jail`), set after
//! the router's connect: the container cannot connect it again.

use super::claims::Target;
use super::endpoint::{HostEndpoint, OverlayEndpoint};
use super::ports::{port_taken, BoundSocket};
use super::resolve::Announced;
use super::{errno_reply, ok, Caller, Reply, TcpService};
use crate::sys;
use freeflow_proto::control::ContainerEntry;
use freeflow_proto::peer::PeerMsg;
use freeflow_proto::sockmsg::{SockNotice, SockReply, SockRequest};
use std::io;
use std::net::Ipv4Addr;
use std::time::Instant;

impl TcpService {
    pub(super) fn connect(
        &mut self,
        caller: Caller<'_>,
        req: SockRequest,
        host_ip: Ipv4Addr,
        v6: bool,
    ) -> Reply {
        let dst = OverlayEndpoint::new(req.ip, req.port);
        let tenant = caller.container.tenant.as_str();
        let Some((key, listener)) = self.connect_target(caller.container, dst, host_ip) else {
            self.counters.fell_back(tenant);
            return (SockReply::fallback(req.seq), None);
        };
        let me = caller.container.ip;
        if key.dst_host != host_ip && !v6 {
            if let Some(answer) = self.connect_claimed(key, listener, caller.container, req.seq) {
                return answer;
            }
        }
        let result = self
            .ports
            .take(host_ip, v6)
            .and_then(|bound| self.connect_announced(key, listener, host_ip, bound, v6));
        if result.as_ref().is_err_and(port_taken) {
            // No port is free for every destination (many connections in TIME_WAIT), or not
            // towards this one. A port connect picks would be announced only after the SYN,
            // and the server could meet an older announcement of that port first: the overlay
            // is the safe way (the server's router relays the client at accept).
            self.counters.fell_back(tenant);
            return (SockReply::fallback(req.seq), None);
        }
        match result {
            Ok(bound) => {
                self.counters.connected(tenant, false);
                let source = OverlayEndpoint::new(me, bound.port);
                (ok(req.seq, source), Some(bound.socket))
            }
            Err(e) => (errno_reply(req.seq, &e), None),
        }
    }

    /// Where a connect of `container` to overlay address `dst` goes: the host listener, and
    /// what its announcement names. Policy: only registered overlay addresses of the caller's
    /// own tenant, with an accelerated listener.
    fn connect_target(
        &self,
        container: &ContainerEntry,
        dst: OverlayEndpoint,
        host_ip: Ipv4Addr,
    ) -> Option<(Target, HostEndpoint)> {
        let placement = self.registry.placement(dst.ip())?;
        if placement.tenant != container.tenant {
            return None;
        }
        let dst_host = placement.host;
        let listener = if dst_host == host_ip {
            let l = self.listeners.local.get(&dst)?;
            HostEndpoint::new(host_ip, l.host_port)
        } else {
            self.listeners.remote(dst_host, dst)?
        };
        let key = Target {
            container: container.ip,
            dst_host,
            to_port: listener.port(),
        };
        Some((key, listener))
    }

    /// A connect from a socket of the claim pool `key`, if one is ready: the answer, or `None`
    /// for the general way.
    fn connect_claimed(
        &mut self,
        key: Target,
        listener: HostEndpoint,
        container: &ContainerEntry,
        seq: u32,
    ) -> Option<Reply> {
        let BoundSocket { socket, port } = self.take_claimed(key)?;
        match sys::connect_nonblocking(&socket, listener.ip(), listener.port(), false) {
            Ok(_) => {
                crate::jail::mark_connection(&socket);
                self.counters.connected(&container.tenant, true);
                Some((
                    ok(seq, OverlayEndpoint::new(container.ip, port)),
                    Some(socket),
                ))
            }
            // The four-tuple is taken (a connection from that port to this listener in
            // TIME_WAIT): the port is given back (the socket closes here, so the claim
            // must go too), and the general way is taken.
            Err(e) if port_taken(&e) => {
                self.claims.unused(key, port);
                None
            }
            Err(e) => Some((errno_reply(seq, &e), None)),
        }
    }

    /// Announces host port `bound.port` for `key`, then connects it to `listener`.
    fn connect_announced(
        &mut self,
        key: Target,
        listener: HostEndpoint,
        host_ip: Ipv4Addr,
        bound: BoundSocket,
        v6: bool,
    ) -> io::Result<BoundSocket> {
        let from = HostEndpoint::new(host_ip, bound.port);
        // Announce before connecting, so the announcement is on its way before the SYN.
        self.announce(key, from);
        match sys::connect_nonblocking(&bound.socket, listener.ip(), listener.port(), v6) {
            Ok(_) => {
                // After the connect, which the mark would refuse.
                crate::jail::mark_connection(&bound.socket);
                Ok(bound)
            }
            Err(e) => {
                // The port is free again (the socket closes here): take the word back.
                self.retract(key, from);
                Err(e)
            }
        }
    }

    /// Tells the destination's router (or this router's own listeners) which overlay address
    /// host address `from` (a port of this host) stands for.
    fn announce(&mut self, t: Target, from: HostEndpoint) {
        if t.dst_host == from.ip() {
            let announced = Announced {
                client: OverlayEndpoint::new(t.container, from.port()),
                at: Instant::now(),
                to_port: Some(t.to_port),
                claimed: false,
            };
            self.announcements.announced.insert(from, announced);
            self.notify(t.to_port, from);
        } else {
            let conn = PeerMsg::Conn {
                host: from.ip(),
                host_port: from.port(),
                ip: t.container,
                port: from.port(),
                to_port: Some(t.to_port),
            };
            self.send_to(t.dst_host, &conn);
        }
    }

    /// Takes back the announcement of host address `from`, whose connect failed.
    fn retract(&mut self, t: Target, from: HostEndpoint) {
        if t.dst_host == from.ip() {
            if self.announcements.take_back(from, t.container, t.to_port) {
                self.tell_listener(t.to_port, SockNotice::forget(from.into()));
            }
        } else {
            self.send_release(t, &[from.port()]);
        }
    }
}
