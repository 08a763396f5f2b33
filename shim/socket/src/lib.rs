//! libfsocket.so: Freeflow's TCP mode, preloaded into unmodified applications
//! (`LD_PRELOAD=$FREEFLOW_DIR/libfsocket.so`, with `VNET_PREFIX` naming the overlay).
//!
//! A TCP connect to, or listen on, an overlay address is set up by the host's router, which
//! hands back a host-network socket; the shim puts it under the application's fd number with
//! dup3, so reads, writes, poll and epoll go straight to the kernel on the host network.
//! getsockname, getpeername and accept report the overlay addresses the application used.
//! Everything else (UDP, Unix sockets, addresses outside VNET_PREFIX, a container that is not
//! registered, a router that is down) takes the normal path untouched.
//!
//! Unsafe code is confined (by `#![deny(unsafe_code)]` here) to the modules that allow it: `abi`
//! (the exported C functions), `real` (the C library's functions through dlsym, raw socket
//! calls), `epoll`, `inherit` and `session` (descriptors the application owns, by number),
//! `forklock` (a lock held across fork), `private` (the shim's own descriptors), and in this file the load-time registration of the
//! fork handlers and the exported version string. `state` is safe code; the other OS calls go
//! through `freeflow-os`.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod abi;
#[allow(unsafe_code)]
mod epoll;
#[allow(unsafe_code)]
mod forklock;
mod guard;
#[allow(unsafe_code)]
mod inherit;
#[allow(unsafe_code)]
mod overlay_accept;
#[allow(unsafe_code)]
mod private;
#[allow(unsafe_code)]
mod real;
#[allow(unsafe_code)]
mod session;
mod state;

/// Version of the shim, for `strings libfsocket.so`.
#[allow(unsafe_code)]
#[no_mangle]
#[used]
pub static FREEFLOW_FSOCKET_VERSION: [u8; 6] = *b"0.1.0\0";

/// Runs when the library is loaded: registers the fork handler and takes back the sockets an
/// exec passed on.
#[allow(unsafe_code)]
extern "C" fn on_load() {
    // Not in the crate's unit tests: the test harness reports their panics.
    #[cfg(not(test))]
    guard::quiet_panics();
    // SAFETY: registers three `extern "C" fn()` handlers that live as long as the process (this
    // library is never unloaded: it is preloaded).
    unsafe {
        libc::pthread_atfork(
            Some(before_fork),
            Some(after_fork_in_parent),
            Some(after_fork_in_child),
        )
    };
    inherit::adopt();
}

/// Before fork: takes every lock of the shim, so that the child does not inherit one held by
/// another thread (it would wait for it forever). Fork waits while a thread is in a request to
/// the router.
extern "C" fn before_fork() {
    session::SESSION.hold_across_fork();
    state::TABLE.hold_across_fork();
    epoll::EPOLL_FDS.hold_across_fork();
    epoll::MIRRORS.hold_across_fork();
}

/// In the parent after fork: the listeners now have other holders; closing one here must not
/// take it from a child that has not claimed it yet.
extern "C" fn after_fork_in_parent() {
    epoll::MIRRORS.release_in_parent();
    epoll::EPOLL_FDS.release_in_parent();
    state::TABLE.release_in_parent();
    session::SESSION.release_in_parent();
    state::note_fork();
}

/// In a forked child: claim the inherited listeners with a session of the child's own.
extern "C" fn after_fork_in_child() {
    epoll::MIRRORS.release_in_child();
    epoll::EPOLL_FDS.release_in_child();
    state::TABLE.release_in_child();
    session::SESSION.release_in_child();
    state::note_fork();
    session::forget_watcher_after_fork();
    let ports = state::listener_ports();
    if !ports.is_empty() {
        session::claim_inherited_listeners(&ports);
        // The child holds the listeners' overlay listeners too (the shim's duplicates): if
        // the router goes, it must stop them listening even before its first accept (a
        // daemon whose parent exits, a pre-fork server's master that never accepts).
        session::ensure_watcher();
    }
}

#[allow(unsafe_code)]
#[used]
#[link_section = ".init_array"]
static ON_LOAD: extern "C" fn() = on_load;
