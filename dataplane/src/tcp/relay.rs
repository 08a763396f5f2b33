//! Clients that reach an accelerated listener's overlay address without Freeflow (a container
//! not using the shim, or a host outside the cluster). The router accepts them on the
//! application's overlay listener, rings the host listener for each (a "doorbell" connection
//! from the loopback address), and the application's accept of that connection gets the
//! client's own connection instead (the Resolve reply carries it), so it accepts them where it
//! accepts everything else. From then on the router holds nothing for the client: its bytes
//! never pass through the router.
//!
//! What a relayed client costs the router, and how it is bounded:
//! - While it waits for the application's accept, two descriptors (the client's connection and
//!   the doorbell). Waiting clients are bounded per listener (its backlog, within
//!   [`MAX_RELAYS_PER_LISTENER`]), per container and in all. A listener whose share is full is
//!   not polled: its further clients wait in the kernel's accept queue of the overlay listener,
//!   as for any server whose accept queue is full, and are taken as the application accepts;
//!   none is turned away.
//! - No host port: doorbells come from the loopback address, and close with a reset (no
//!   TIME_WAIT), so relaying never uses up the host address's ports that connects need. No
//!   router announces a loopback address, so no process holds a notice about a doorbell.

use super::endpoint::{HostEndpoint, OverlayEndpoint};
use super::{ok, TcpService};
use crate::sys::{self, GuardedAccept};
use freeflow_proto::sockmsg::SockReply;
use std::collections::HashMap;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// How long a client that reached an overlay listener without Freeflow waits, in the router,
/// for the application to accept it through the host listener.
const RELAY_TTL: Duration = Duration::from_secs(60);
/// How often waiting clients are checked (their time, their listener still there).
const EXPIRE_EVERY: Duration = Duration::from_millis(100);
/// Clients taken from one overlay listener per turn of the control loop (the rest wait for
/// the next turn): the applications' Resolves, served after, do not wait behind many
/// doorbells' handshakes.
const RELAY_BATCH: usize = 16;
/// Clients without Freeflow waiting for one listener's accept at most, whatever its backlog
/// (the kernel's own cap on a backlog, `net.core.somaxconn`, is 4096 by default).
pub(super) const MAX_RELAYS_PER_LISTENER: usize = 1024;
/// The least share of a listener with a small backlog: its doorbells may wait in the host
/// listener's queue a little longer than the application's backlog says.
const MIN_RELAYS_PER_LISTENER: usize = 16;
/// Clients without Freeflow waiting for all the listeners of one container together: a
/// container with many listeners fills a quarter of the pool at most, never the whole of it.
pub(super) const MAX_RELAYS_PER_CONTAINER: usize = 1024;
/// Relayed clients waiting in all (each holds two descriptors of the router).
pub(super) const MAX_RELAYS: usize = 4096;
/// Where doorbells come from: no router announces it, and its ports are not the host
/// address's.
const DOORBELL_SOURCE: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// The share of waiting clients of a listener whose application asked for `backlog` (0: the
/// kernel's default, or unknown).
pub(super) fn listener_share(backlog: u32) -> usize {
    match backlog as usize {
        0 => MAX_RELAYS_PER_LISTENER,
        n => n.clamp(MIN_RELAYS_PER_LISTENER, MAX_RELAYS_PER_LISTENER),
    }
}

/// A client that reached an overlay listener without Freeflow, waiting to be accepted: the
/// router connected `doorbell` to the host listener, and the application's accept of that
/// connection gets `conn` instead.
struct Relay {
    conn: OwnedFd,
    _doorbell: OwnedFd,
    listener: OverlayEndpoint,
    /// The client's address, as the overlay listener saw it.
    peer: OverlayEndpoint,
    since: Instant,
}

#[derive(Default)]
pub(super) struct Relays {
    /// Relayed clients by the doorbell's address.
    waiting: HashMap<HostEndpoint, Relay>,
    /// How many of `waiting` each listener has, and each container (overlay address).
    by_listener: HashMap<OverlayEndpoint, usize>,
    by_container: HashMap<Ipv4Addr, usize>,
    /// When the waiting clients are next checked.
    next_check: Option<Instant>,
    /// Overlay listeners found readable, served at the end of the control loop's turn.
    readable: Vec<RawFd>,
    /// Doorbells of clients handed over in this turn, closed at its end: the reset a close
    /// sends is not on the way of the Resolve's reply.
    rung: Vec<OwnedFd>,
    /// Accepts on overlay listeners (which containers share) run under this timer.
    guard: Option<GuardedAccept>,
}

impl Relays {
    fn hold(&mut self, from: HostEndpoint, relay: Relay) {
        *self.by_listener.entry(relay.listener).or_default() += 1;
        *self.by_container.entry(relay.listener.ip()).or_default() += 1;
        self.next_check
            .get_or_insert(relay.since + EXPIRE_EVERY.min(RELAY_TTL));
        if let Some(old) = self.waiting.insert(from, relay) {
            // A doorbell address is unique while its socket lives; never reached.
            self.uncount(old.listener);
        }
    }

    fn take(&mut self, from: HostEndpoint) -> Option<Relay> {
        let relay = self.waiting.remove(&from)?;
        self.uncount(relay.listener);
        Some(relay)
    }

    fn uncount(&mut self, listener: OverlayEndpoint) {
        for count in [
            self.by_listener.get_mut(&listener),
            self.by_container.get_mut(&listener.ip()),
        ]
        .into_iter()
        .flatten()
        {
            *count = count.saturating_sub(1);
        }
        if self.by_listener.get(&listener) == Some(&0) {
            self.by_listener.remove(&listener);
        }
        if self.by_container.get(&listener.ip()) == Some(&0) {
            self.by_container.remove(&listener.ip());
        }
    }

    /// A relayed client waits until accepted, its time is up, or its listener is gone
    /// (checked every [`EXPIRE_EVERY`]).
    pub fn expire(&mut self, now: Instant, listening: impl Fn(OverlayEndpoint) -> bool) {
        if self.next_check.is_none_or(|at| now < at) {
            return;
        }
        let gone: Vec<HostEndpoint> = self
            .waiting
            .iter()
            .filter(|(_, r)| now.duration_since(r.since) >= RELAY_TTL || !listening(r.listener))
            .map(|(&from, _)| from)
            .collect();
        for from in gone {
            self.take(from);
        }
        self.next_check = (!self.waiting.is_empty()).then_some(now + EXPIRE_EVERY);
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.next_check
    }

    /// How many more clients of `listener`, whose share is `share`, may wait: within the
    /// listener's share, its container's (all listeners on the listener's overlay address)
    /// and the pool.
    pub(super) fn room_for(&self, listener: OverlayEndpoint, share: usize) -> usize {
        let held = self.by_listener.get(&listener).copied().unwrap_or(0);
        let held_by_container = self.by_container.get(&listener.ip()).copied().unwrap_or(0);
        share
            .saturating_sub(held)
            .min(MAX_RELAYS_PER_CONTAINER.saturating_sub(held_by_container))
            .min(MAX_RELAYS.saturating_sub(self.waiting.len()))
    }

    /// Holds a client of `listener` as if it had been relayed, behind doorbell address `from`
    /// (tests of the shares).
    #[cfg(test)]
    pub(super) fn hold_for_test(
        &mut self,
        listener: OverlayEndpoint,
        from: HostEndpoint,
        conn: OwnedFd,
        doorbell: OwnedFd,
    ) {
        let peer = OverlayEndpoint::new(Ipv4Addr::new(10, 99, 0, 1), 1);
        let relay = Relay {
            conn,
            _doorbell: doorbell,
            listener,
            peer,
            since: Instant::now(),
        };
        self.hold(from, relay);
    }

    /// How many clients wait in all (tests).
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

impl TcpService {
    /// The relayed client behind doorbell `key`, for a Resolve by container `container_ip`:
    /// `None` if `key` is no doorbell. Only the container that holds the listener gets the
    /// client.
    pub(super) fn take_relayed(
        &mut self,
        key: HostEndpoint,
        container_ip: Ipv4Addr,
        seq: u32,
    ) -> Option<(SockReply, Option<OwnedFd>)> {
        let relay = self.relays.waiting.get(&key)?;
        if relay.listener.ip() != container_ip {
            return Some((SockReply::error(seq, libc::ECONNREFUSED), None));
        }
        let Relay {
            conn,
            _doorbell: doorbell,
            peer,
            ..
        } = self.relays.take(key).expect("present");
        let tenant = self
            .registry
            .placement(container_ip)
            .map(|p| p.tenant.as_str());
        self.counters.relayed_to(tenant);
        // The client's connection goes to the application; the doorbell closes after the
        // reply (with a reset: it holds no port afterwards).
        self.relays.rung.push(doorbell);
        Some((ok(seq, peer), Some(conn)))
    }

    /// The overlay listeners to poll: those whose share of waiting clients is not full (the
    /// others' clients wait in the kernel's accept queue meanwhile).
    pub(super) fn relay_poll_fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> + '_ {
        self.listeners.local.iter().filter_map(|(&key, l)| {
            let overlay = l.overlay.as_ref()?;
            (self.relays.room_for(key, listener_share(l.backlog)) > 0).then(|| overlay.as_fd())
        })
    }

    /// Notes that overlay listener `fd` has clients waiting: they are taken at the end of the
    /// turn ([`Self::relay_readable`]), after the turn's requests are answered, so that the
    /// applications' Resolves (each holds up a server's accept) do not wait behind doorbells.
    pub(super) fn relay_later(&mut self, fd: RawFd) {
        if !self.relays.readable.contains(&fd) {
            self.relays.readable.push(fd);
        }
    }

    /// Closes the doorbells of the clients handed over in this turn, and takes the clients of
    /// the overlay listeners found readable.
    pub(super) fn relay_readable(&mut self) {
        self.relays.rung.clear();
        for fd in std::mem::take(&mut self.relays.readable) {
            self.relay_from(fd);
        }
    }

    /// Takes the clients waiting on the overlay listener `fd` (they came without Freeflow), as
    /// many as the listener's share has room for, and rings the host listener for each, so the
    /// application accepts them where it accepts everything else.
    pub(super) fn relay_from(&mut self, fd: RawFd) {
        let Some(host_ip) = self.registry.host_ip() else {
            return;
        };
        let Some((&key, listener)) = self
            .listeners
            .local
            .iter()
            .find(|(_, l)| l.overlay.as_ref().is_some_and(|o| o.as_raw_fd() == fd))
        else {
            return;
        };
        let host_listener = HostEndpoint::new(host_ip, listener.host_port);
        let room = self.relays.room_for(key, listener_share(listener.backlog));
        if self.relays.guard.is_none() {
            match GuardedAccept::new() {
                Ok(guard) => self.relays.guard = Some(guard),
                Err(e) => {
                    log::warn!("tcp: no accept timer ({e}); overlay listeners off");
                    return self.listeners.give_up_overlay(key);
                }
            }
        }
        for (conn, peer_ip, peer_port) in self.accept_clients(key, room.min(RELAY_BATCH)) {
            let peer = OverlayEndpoint::new(peer_ip, peer_port);
            self.ring_doorbell(key, host_listener, conn, peer);
        }
    }

    /// Accepts up to `most` clients on the overlay listener of `key` (which has one); gives
    /// the listener up if it fails.
    fn accept_clients(
        &mut self,
        key: OverlayEndpoint,
        most: usize,
    ) -> Vec<(OwnedFd, Ipv4Addr, u16)> {
        let guard = self.relays.guard.as_ref().expect("set before");
        let overlay = self.listeners.local[&key]
            .overlay
            .as_ref()
            .expect("matched before");
        let mut taken = Vec::new();
        let mut give_up = None;
        while taken.len() < most {
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
            log::warn!("tcp: overlay listener {key} given up: {e}");
            self.listeners.give_up_overlay(key);
        }
        taken
    }

    /// Connects a doorbell to the host listener of `key` for client `conn`, whose address is
    /// `peer`. On failure the client's connection closes with `conn`: it sees a reset, as when
    /// a server's accept queue overflows.
    fn ring_doorbell(
        &mut self,
        key: OverlayEndpoint,
        host_listener: HostEndpoint,
        conn: OwnedFd,
        peer: OverlayEndpoint,
    ) {
        let doorbell = (|| -> io::Result<(OwnedFd, u16)> {
            let socket = sys::tcp_socket(false)?;
            sys::set_linger_zero(&socket)?;
            sys::bind(&socket, DOORBELL_SOURCE, 0, false)?;
            let port = sys::local_port(&socket)?;
            sys::connect_nonblocking(&socket, host_listener.ip(), host_listener.port(), false)?;
            Ok((socket, port))
        })();
        match doorbell {
            Ok((doorbell, port)) => {
                let relay = Relay {
                    conn,
                    _doorbell: doorbell,
                    listener: key,
                    peer,
                    since: Instant::now(),
                };
                self.relays
                    .hold(HostEndpoint::new(DOORBELL_SOURCE, port), relay);
            }
            Err(e) => log::warn!("tcp: relay for {key}: {e}"),
        }
    }
}
