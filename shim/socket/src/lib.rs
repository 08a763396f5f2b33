//! libfsocket.so: Freeflow's TCP mode, preloaded into unmodified applications
//! (`LD_PRELOAD=$FREEFLOW_DIR/libfsocket.so`).
//!
//! Status: this build intercepts nothing yet. It is a real shared object that `freeflow up`
//! installs and that loads into any program without changing its behaviour, so deployments can
//! be set up now; the socket interception (connect/listen/accept through the router, then a
//! host-network socket) is the TCP-mode work item. Until then every connection takes the
//! overlay path, exactly as without the library.

/// Version of the shim, for `strings libfsocket.so` and future `freeflow status` checks.
#[no_mangle]
#[used]
pub static FREEFLOW_FSOCKET_VERSION: [u8; 6] = *b"0.1.0\0";
