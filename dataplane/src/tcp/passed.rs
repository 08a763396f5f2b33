//! Checks of the descriptors a container passes with a request. The container is not trusted:
//! a descriptor is used only if it is what the shim says it is.

use crate::sys::{self, Untrusted};
use std::io;
use std::net::Ipv4Addr;

/// Why a passed descriptor is refused.
#[derive(Debug, thiserror::Error)]
pub(super) enum Unusable {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("a host-network socket")]
    HostNetwork,
    #[error("not a host-network socket")]
    NotHostNetwork,
    #[error("not a stream socket")]
    NotStream,
    #[error("not an internet socket")]
    NotInternet,
    #[error("not listening")]
    NotListening,
    #[error("bound to port {0}")]
    OtherPort(u16),
    #[error("not a TCP listener")]
    NotTcpListener,
    #[error("bound to {0}, not this host")]
    OtherHost(Ipv4Addr),
    #[error("an IPv6-only socket (the overlay is IPv4)")]
    V6Only,
}

/// Whether a descriptor a container passed is an AF_INET6 socket with IPV6_V6ONLY: such a
/// listener never takes IPv4 clients, so it is no overlay listener (the shim leaves it to the
/// kernel; one that passes it anyway gets "fall back").
pub(super) fn v6_only(fd: &Untrusted) -> bool {
    let opt = |level, name| sys::int_opt(fd.as_fd(), level, name);
    opt(libc::SOL_SOCKET, libc::SO_DOMAIN).is_ok_and(|d| d == libc::AF_INET6)
        && opt(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY).is_ok_and(|v| v != 0)
}

/// Checks that a descriptor a container passed is what the shim says it is: a TCP socket
/// listening on overlay port `port` that takes IPv4 clients (AF_INET, or AF_INET6 dual-stack:
/// bound to `::` or a v4-mapped address, its IPv4 clients arriving v4-mapped); then makes it
/// non-blocking for the control loop. The container is not trusted: anything else is refused.
pub(super) fn overlay_listener_ok(fd: &Untrusted, port: u16) -> Result<(), Unusable> {
    // Only the container's own sockets: one in our namespace would be a host socket.
    if sys::in_our_netns(fd.as_fd())? {
        return Err(Unusable::HostNetwork);
    }
    let opt = |level, name| sys::int_opt(fd.as_fd(), level, name);
    if opt(libc::SOL_SOCKET, libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(Unusable::NotStream);
    }
    let domain = opt(libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return Err(Unusable::NotInternet);
    }
    if v6_only(fd) {
        return Err(Unusable::V6Only);
    }
    if opt(libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 1 {
        return Err(Unusable::NotListening);
    }
    // Any address of either family (`::` has no IPv4 form): only the port matters here. A
    // duplicate to read it: closing it later is not the last close of the socket.
    let bound = sys::local_port(&fd.try_clone()?)?;
    if bound != port {
        return Err(Unusable::OtherPort(bound));
    }
    Ok(sys::set_nonblocking(fd.as_fd())?)
}

/// Checks that a descriptor a container handed back is a TCP listener on `host_ip`; its port.
pub(super) fn host_listener_ok(fd: &Untrusted, host_ip: Ipv4Addr) -> Result<u16, Unusable> {
    // A container can bind a socket of its own to this host's address (IP_FREEBIND needs no
    // privilege), but cannot make one in our namespace: only a router gave it those.
    if !sys::in_our_netns(fd.as_fd())? {
        return Err(Unusable::NotHostNetwork);
    }
    let opt = |level, name| sys::int_opt(fd.as_fd(), level, name);
    if opt(libc::SOL_SOCKET, libc::SO_TYPE)? != libc::SOCK_STREAM
        || opt(libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 1
    {
        return Err(Unusable::NotTcpListener);
    }
    let (ip, port) = sys::local_addr(fd.as_fd())?;
    if ip != host_ip {
        return Err(Unusable::OtherHost(ip));
    }
    Ok(port)
}
