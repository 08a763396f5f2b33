//! Clients that reach an accelerated listener's overlay address without Freeflow (a container
//! not using the shim, or a host outside the cluster). The router accepts them on the
//! application's overlay listener, rings the host listener for each (a "doorbell" connection),
//! and the application's accept of that connection gets the client instead, so it accepts them
//! where it accepts everything else.

use super::endpoint::{HostEndpoint, OverlayEndpoint};
use super::{ok, TcpService};
use crate::sys::{self, GuardedAccept};
use freeflow_proto::sockmsg::{SockNotice, SockReply};
use std::collections::HashMap;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// How long a client that reached an overlay listener without Freeflow waits, in the router,
/// for the application to accept it through the host listener.
const RELAY_TTL: Duration = Duration::from_secs(60);
/// Clients taken from one overlay listener per wake-up (the rest wait for the next turn).
const RELAY_BATCH: usize = 64;
/// Clients without Freeflow held for one listener's application at most; more are turned away
/// (reset), as a full accept queue would, so that a container cannot pile up the router's fds.
pub(super) const MAX_RELAYS_PER_LISTENER: usize = 256;
/// Clients without Freeflow held for all the listeners of one container together: a container
/// with many listeners fills a quarter of the pool at most, never the whole of it.
pub(super) const MAX_RELAYS_PER_CONTAINER: usize = 1024;
/// Relayed clients waiting in all (each holds two fds and a host port).
pub(super) const MAX_RELAYS: usize = 4096;

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
    /// Relayed clients by the doorbell's host address.
    waiting: HashMap<HostEndpoint, Relay>,
    /// Accepts on overlay listeners (which containers share) run under this timer.
    guard: Option<GuardedAccept>,
}

impl Relays {
    /// A relayed client waits until accepted, its time is up, or its listener is gone.
    pub fn expire(&mut self, now: Instant, listening: impl Fn(OverlayEndpoint) -> bool) {
        self.waiting
            .retain(|_, r| now.duration_since(r.since) < RELAY_TTL && listening(r.listener));
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.waiting.values().map(|r| r.since + RELAY_TTL).min()
    }

    /// How many clients of `listener` wait, and how many more may: within the listener's
    /// share, its container's (all listeners on the listener's overlay address) and the pool.
    pub(super) fn room_for(&self, listener: OverlayEndpoint) -> (usize, usize) {
        let (mut held, mut held_by_container) = (0, 0);
        for r in self.waiting.values() {
            if r.listener.ip() == listener.ip() {
                held_by_container += 1;
                if r.listener == listener {
                    held += 1;
                }
            }
        }
        let room = MAX_RELAYS_PER_LISTENER
            .saturating_sub(held)
            .min(MAX_RELAYS_PER_CONTAINER.saturating_sub(held_by_container))
            .min(MAX_RELAYS.saturating_sub(self.waiting.len()));
        (held, room)
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
        self.waiting.insert(from, relay);
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
        let relay = self.relays.waiting.remove(&key).expect("present");
        let tenant = self
            .registry
            .placement(container_ip)
            .map(|p| p.tenant.as_str());
        self.counters.relayed_to(tenant);
        Some((ok(seq, relay.peer), Some(relay.conn)))
    }

    /// Takes the clients waiting on the overlay listener `fd` (they came without Freeflow) and
    /// rings the host listener for each, so the application accepts them where it accepts
    /// everything else.
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
        if self.relays.guard.is_none() {
            match GuardedAccept::new() {
                Ok(guard) => self.relays.guard = Some(guard),
                Err(e) => {
                    log::warn!("tcp: no accept timer ({e}); overlay listeners off");
                    return self.listeners.give_up_overlay(key);
                }
            }
        }
        let mut taken = self.accept_clients(key);
        let (held, room) = self.relays.room_for(key);
        if taken.len() > room {
            log::warn!(
                "tcp: {} clients of {key} turned away: {held} wait for accept",
                taken.len() - room
            );
            taken.truncate(room);
        }
        for (conn, peer_ip, peer_port) in taken {
            let peer = OverlayEndpoint::new(peer_ip, peer_port);
            self.ring_doorbell(key, host_listener, conn, peer);
        }
    }

    /// Accepts up to [`RELAY_BATCH`] clients on the overlay listener of `key` (which has one);
    /// gives the listener up if it fails.
    fn accept_clients(&mut self, key: OverlayEndpoint) -> Vec<(OwnedFd, Ipv4Addr, u16)> {
        let guard = self.relays.guard.as_ref().expect("set before");
        let overlay = self.listeners.local[&key]
            .overlay
            .as_ref()
            .expect("matched before");
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
            sys::bind(&socket, host_listener.ip(), 0, false)?;
            let port = sys::local_port(&socket)?;
            sys::connect_nonblocking(&socket, host_listener.ip(), host_listener.port(), false)?;
            Ok((socket, port))
        })();
        match doorbell {
            Ok((doorbell, port)) => {
                let from = HostEndpoint::new(host_listener.ip(), port);
                // The doorbell's host port may have been claimed or announced before: only
                // a Resolve hands this client over.
                let forget = SockNotice::forget(from.into());
                let owners = self.listeners.owners_of(key);
                self.notices.extend(owners.into_iter().map(|o| (o, forget)));
                let relay = Relay {
                    conn,
                    _doorbell: doorbell,
                    listener: key,
                    peer,
                    since: Instant::now(),
                };
                self.relays.waiting.insert(from, relay);
            }
            Err(e) => log::warn!("tcp: relay for {key}: {e}"),
        }
    }
}
