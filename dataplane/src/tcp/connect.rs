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
use std::os::fd::OwnedFd;
use std::time::Instant;

impl TcpService {
    /// Serves a Connect up to its kernel work: the policy check, and a host socket bound to a
    /// port announced (or claimed ahead) for it. The connect itself is the [`ConnectJob`]'s,
    /// run by a shard or inline ([`TcpService::run_inline`]).
    pub(super) fn connect(
        &mut self,
        caller: Caller<'_>,
        req: SockRequest,
        host_ip: Ipv4Addr,
        v6: bool,
    ) -> Setup {
        let dst = OverlayEndpoint::new(req.ip, req.port);
        let tenant = caller.container.tenant.as_str();
        let Some((key, listener)) = self.connect_target(caller.container, dst, host_ip) else {
            self.counters.fell_back(tenant);
            return Setup::Reply((SockReply::fallback(req.seq), None));
        };
        if key.dst_host != host_ip && !v6 {
            if let Some(bound) = self.take_claimed(key) {
                self.counters.connected(tenant, true);
                return Setup::Connect(ConnectJob {
                    attachment: caller.attachment,
                    seq: req.seq,
                    key,
                    listener,
                    bound,
                    v6,
                    claimed: true,
                    tenant: tenant.to_owned(),
                });
            }
        }
        self.connect_general(
            caller.attachment,
            req.seq,
            tenant,
            key,
            listener,
            host_ip,
            v6,
        )
    }

    /// A connect from a newly bound host port, announced to the listener's router first.
    #[allow(clippy::too_many_arguments)]
    fn connect_general(
        &mut self,
        attachment: u32,
        seq: u32,
        tenant: &str,
        key: Target,
        listener: HostEndpoint,
        host_ip: Ipv4Addr,
        v6: bool,
    ) -> Setup {
        match self.ports.take(host_ip, v6) {
            Ok(bound) => {
                // Announce before connecting, so the announcement is on its way before the SYN.
                self.announce(key, HostEndpoint::new(host_ip, bound.port));
                self.counters.connected(tenant, false);
                Setup::Connect(ConnectJob {
                    attachment,
                    seq,
                    key,
                    listener,
                    bound,
                    v6,
                    claimed: false,
                    tenant: tenant.to_owned(),
                })
            }
            // No port is free for every destination (many connections in TIME_WAIT): see
            // `connect_failed`.
            Err(e) if port_taken(&e) => {
                self.counters.fell_back(tenant);
                Setup::Reply((SockReply::fallback(seq), None))
            }
            Err(e) => Setup::Reply((errno_reply(seq, &e), None)),
        }
    }

    /// Finishes a connect whose kernel connect failed (the socket is closed): the port's
    /// announcement or claim is taken back, and the answer is an error, "fall back", or, for a
    /// claimed port whose four-tuple is taken, a connect from a new port.
    pub fn connect_failed(&mut self, failed: FailedConnect) -> Setup {
        let FailedConnect {
            attachment,
            seq,
            key,
            listener,
            port,
            v6,
            claimed,
            tenant,
            error,
        } = failed;
        self.counters.not_connected(&tenant, claimed);
        let Some(host_ip) = self.registry.host_ip() else {
            return Setup::Reply((SockReply::fallback(seq), None));
        };
        if claimed {
            // Its socket closed, so the claim must go too.
            self.claims.unused(key, port);
            if !port_taken(&error) {
                return Setup::Reply((errno_reply(seq, &error), None));
            }
            // The four-tuple is taken (a connection from that port to this listener in
            // TIME_WAIT): the general way is taken.
            return self.connect_general(attachment, seq, &tenant, key, listener, host_ip, v6);
        }
        // The port is free again (the socket closed): take the word back.
        self.retract(key, HostEndpoint::new(host_ip, port));
        if port_taken(&error) {
            // Not towards this destination. A port connect picks would be announced only
            // after the SYN, and the server could meet an older announcement of that port
            // first: the overlay is the safe way (the server's router relays the client).
            self.counters.fell_back(&tenant);
            return Setup::Reply((SockReply::fallback(seq), None));
        }
        Setup::Reply((errno_reply(seq, &error), None))
    }

    /// Runs a connect's kernel work on this thread (no shard to take it), to the reply.
    pub fn run_inline(&mut self, mut job: ConnectJob) -> Reply {
        // At most twice: a retry after a failure is never from a claimed port.
        loop {
            match job.run() {
                ConnectOutcome::Connected { reply, socket, .. } => return (reply, Some(socket)),
                ConnectOutcome::Failed(failed) => match self.connect_failed(failed) {
                    Setup::Reply(reply) => return reply,
                    Setup::Connect(next) => job = next,
                    Setup::Deferred => unreachable!("a connect is never deferred"),
                },
            }
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

/// What serving a request came to.
pub enum Setup {
    /// The answer, and the socket to pass with it.
    Reply(Reply),
    /// A connect whose kernel work is left to do (on a shard, or inline).
    Connect(ConnectJob),
    /// A resolve waiting for its announcement: answered later.
    Deferred,
}

/// The kernel half of an accelerated connect: a host socket bound to a port the listener's
/// router knows (claimed ahead or just announced) connects to the listener, takes the jail's
/// connection mark, and goes to the process with the reply. It holds no reference to the
/// service, so that a shard can run it beside the control thread: the kernel's connect (both
/// ends' SYN handling over veth runs on the calling thread) is most of a connect's CPU.
pub struct ConnectJob {
    /// The requesting process's session.
    pub attachment: u32,
    pub(super) seq: u32,
    pub(super) key: Target,
    pub(super) listener: HostEndpoint,
    pub(super) bound: BoundSocket,
    pub(super) v6: bool,
    pub(super) claimed: bool,
    pub(super) tenant: String,
}

/// How a [`ConnectJob`] ended.
pub enum ConnectOutcome {
    /// Connecting (or connected): the reply and the socket for process `attachment`.
    Connected {
        attachment: u32,
        reply: SockReply,
        socket: OwnedFd,
    },
    /// The kernel refused the connect: for [`TcpService::connect_failed`].
    Failed(FailedConnect),
}

/// A connect the kernel refused (its socket closed), with what it takes to give its port back
/// and answer.
pub struct FailedConnect {
    pub attachment: u32,
    seq: u32,
    key: Target,
    listener: HostEndpoint,
    port: u16,
    v6: bool,
    claimed: bool,
    tenant: String,
    error: io::Error,
}

impl ConnectJob {
    /// Starts the non-blocking connect, so EINPROGRESS, SO_ERROR and ECONNREFUSED are the
    /// kernel's own, and marks the socket after it (the mark refuses connects).
    pub fn run(self) -> ConnectOutcome {
        let ConnectJob {
            attachment,
            seq,
            key,
            listener,
            bound: BoundSocket { socket, port },
            v6,
            claimed,
            tenant,
        } = self;
        match sys::connect_nonblocking(&socket, listener.ip(), listener.port(), v6) {
            Ok(_) => {
                crate::jail::mark_connection(&socket);
                let source = OverlayEndpoint::new(key.container, port);
                ConnectOutcome::Connected {
                    attachment,
                    reply: ok(seq, source),
                    socket,
                }
            }
            Err(error) => ConnectOutcome::Failed(FailedConnect {
                attachment,
                seq,
                key,
                listener,
                port,
                v6,
                claimed,
                tenant,
                error,
            }),
        }
    }
}
