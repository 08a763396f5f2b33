//! libfsocket.so: Freeflow's TCP mode, preloaded into unmodified applications
//! (`LD_PRELOAD=$FREEFLOW_DIR/libfsocket.so`, with `VNET_PREFIX` naming the overlay).
//!
//! A TCP connect to, or listen on, an overlay address is set up by the host's router, which
//! hands back a host-network socket; the shim puts it under the application's fd number with
//! dup3, so reads, writes, poll and epoll go straight to the kernel on the host network.
//! getsockname, getpeername and accept report the overlay addresses the application used.
//! Everything else (UDP, Unix sockets, addresses outside VNET_PREFIX, a container that is not
//! registered, a router that is down) takes the normal path untouched.

mod abi;
mod real;
mod session;
mod state;

/// Version of the shim, for `strings libfsocket.so`.
#[no_mangle]
#[used]
pub static FREEFLOW_FSOCKET_VERSION: [u8; 6] = *b"0.1.0\0";
