//! The two kinds of address the TCP service deals in. An overlay endpoint is what applications
//! see (a container's address and a port of it); a host endpoint is where the bytes really
//! flow (a host's address and one of its ports). Both are an IPv4 address and a port, and a
//! connection has one of each: separate types keep the compiler from letting one stand for the
//! other. On the wire (sockmsg, peer messages) both stay a plain address and port.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};

/// An address on the overlay network: a container's IP address and a port of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OverlayEndpoint(SocketAddrV4);

/// An address on the host network: a host's IP address and a port of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostEndpoint(SocketAddrV4);

impl OverlayEndpoint {
    pub fn new(ip: Ipv4Addr, port: u16) -> OverlayEndpoint {
        OverlayEndpoint(SocketAddrV4::new(ip, port))
    }

    pub fn ip(&self) -> Ipv4Addr {
        *self.0.ip()
    }

    pub fn port(&self) -> u16 {
        self.0.port()
    }
}

impl HostEndpoint {
    pub fn new(ip: Ipv4Addr, port: u16) -> HostEndpoint {
        HostEndpoint(SocketAddrV4::new(ip, port))
    }

    pub fn ip(&self) -> Ipv4Addr {
        *self.0.ip()
    }

    pub fn port(&self) -> u16 {
        self.0.port()
    }
}

/// The address and port as the wire formats carry them.
impl From<HostEndpoint> for (Ipv4Addr, u16) {
    fn from(e: HostEndpoint) -> (Ipv4Addr, u16) {
        (e.ip(), e.port())
    }
}

impl fmt::Display for OverlayEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for HostEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
