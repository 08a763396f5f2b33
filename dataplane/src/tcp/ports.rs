//! Host ports for connects: host sockets bound ahead (spares), so that a connect request costs
//! only the connect, and a back-off for when this host has no free port left.

use crate::sys;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

/// Host sockets kept created and bound ahead of connects (IPv4), so that a connect request
/// costs only the connect: they are made after replies, off the requester's path.
const SPARE_SOCKETS: usize = 4;
/// How long binds are not tried after one found no free port.
const PORTS_SHORT_BACKOFF: Duration = Duration::from_secs(1);

/// A host socket bound to this host's address and a port of its own, not connected.
pub(super) struct BoundSocket {
    pub socket: OwnedFd,
    /// The host port (also the overlay port of the connection made from it).
    pub port: u16,
}

#[derive(Default)]
pub(super) struct HostPorts {
    /// Bound, unconnected IPv4 host sockets (never handed out unconnected).
    spare: Vec<BoundSocket>,
    binder: PortBinder,
}

impl HostPorts {
    /// A new bound socket, unless binds are backing off (see [`PortBinder`]).
    pub fn bind(&mut self, host_ip: Ipv4Addr, v6: bool) -> io::Result<BoundSocket> {
        self.binder.bind(host_ip, v6)
    }

    /// A spare socket if one is ready, else a new one.
    pub fn take(&mut self, host_ip: Ipv4Addr, v6: bool) -> io::Result<BoundSocket> {
        let spare = if v6 { None } else { self.spare.pop() };
        spare.map(Ok).unwrap_or_else(|| self.bind(host_ip, v6))
    }

    /// Makes spares up to [`SPARE_SOCKETS`] (after replies, off the requester's path).
    pub fn refill_spares(&mut self, host_ip: Ipv4Addr) {
        while self.spare.len() < SPARE_SOCKETS {
            match self.binder.bind(host_ip, false) {
                Ok(ready) => self.spare.push(ready),
                Err(_) => break,
            }
        }
    }

    /// Drops the spares (bound to an address this host no longer has).
    pub fn clear_spares(&mut self) {
        self.spare.clear();
    }
}

/// The error of a bind or connect that found no usable local port.
pub(super) fn port_taken(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRINUSE) | Some(libc::EADDRNOTAVAIL)
    )
}

/// Binds host sockets to ports of their own ahead of connects, and stops trying for a while
/// when no port is free for every destination: such a bind scans the whole port range before
/// it fails, and the spares and pools would try it on every turn of the control loop.
#[derive(Default)]
struct PortBinder {
    short_until: Option<Instant>,
}

impl PortBinder {
    fn bind(&mut self, host_ip: Ipv4Addr, v6: bool) -> io::Result<BoundSocket> {
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

/// A new host socket bound to `host_ip` and a port the kernel chose, and that port.
fn bound_socket(host_ip: Ipv4Addr, v6: bool) -> io::Result<BoundSocket> {
    let socket = sys::tcp_socket(v6)?;
    sys::bind(&socket, host_ip, 0, v6)?;
    let port = sys::local_port(&socket)?;
    Ok(BoundSocket { socket, port })
}
