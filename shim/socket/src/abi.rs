//! The functions this library exports in place of the C library's: connect, listen, accept,
//! accept4, getsockname, getpeername, close, close_range, closefrom, dup, dup2, dup3, fcntl
//! (F_DUPFD), epoll_create, epoll_create1, epoll_ctl, poll, ppoll,
//! select, pselect, and execve/execv/execvp/execvpe/posix_spawn/posix_spawnp (to pass accelerated
//! sockets on). Each decides from its arguments whether the call concerns an overlay TCP socket;
//! if not, it calls the C library unchanged. Each runs behind the panic guard (`guard`): a panic
//! inside takes the C library's path.

use crate::epoll;
use crate::guard;
use crate::overlay_accept;
use crate::private;
use crate::real::{self, Endpoint};
use crate::session::{self, config, debug};
use crate::state::{self, Accelerated, Role};
use freeflow_proto::sockmsg::{
    SockOp, SockRequest, SockStatus, FLAG_INET6, FLAG_ORPHAN, FLAG_REUSEPORT,
};
use libc::{c_int, sockaddr, socklen_t};
use std::cell::Cell;
use std::net::Ipv4Addr;
use std::os::fd::{IntoRawFd, OwnedFd};

fn is_stream(fd: c_int) -> bool {
    real::get_int_opt(fd, libc::SOL_SOCKET, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
}

fn in_overlay(ip: Ipv4Addr) -> bool {
    config().prefix.is_some_and(|p| p.contains(ip))
}

/// Whether `fd` is in non-blocking mode, read before the router sees the socket (a listen
/// passes it to the router, which makes its own use of it non-blocking).
fn is_nonblocking(fd: c_int) -> Result<bool, c_int> {
    let status_flags = real::fcntl_get(fd, libc::F_GETFL);
    if status_flags < 0 {
        return Err(libc::EBADF);
    }
    Ok(status_flags & libc::O_NONBLOCK != 0)
}

/// Puts `socket` under the application's `fd`, with the fd's blocking mode (`nonblocking`, as it
/// was before the call), its close-on-exec flag and the options the application is likely to
/// have set.
fn install(socket: OwnedFd, fd: c_int, nonblocking: bool) -> Result<(), c_int> {
    let new = socket.into_raw_fd();
    let fd_flags = real::fcntl_get(fd, libc::F_GETFD);
    if fd_flags < 0 {
        real::close(new);
        return Err(libc::EBADF);
    }
    // The router's socket is fresh: O_NONBLOCK is the only status flag F_SETFL could find set.
    real::fcntl_set(
        new,
        libc::F_SETFL,
        if nonblocking { libc::O_NONBLOCK } else { 0 },
    );
    for (level, name) in [
        (libc::IPPROTO_TCP, libc::TCP_NODELAY),
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    ] {
        if let Some(v) = real::get_int_opt(fd, level, name) {
            if v != 0 {
                real::set_int_opt(new, level, name, v);
            }
        }
    }
    let cloexec = if fd_flags & libc::FD_CLOEXEC != 0 {
        libc::O_CLOEXEC
    } else {
        0
    };
    let watched = epoll::registrations_of(fd);
    epoll::forget(fd, &watched);
    let rc = real::dup3(new, fd, cloexec);
    let err = real::errno();
    real::close(new);
    if rc < 0 {
        return Err(err);
    }
    epoll::restore(fd, &watched);
    Ok(())
}

fn fail(errno: c_int) -> c_int {
    real::set_errno(errno);
    -1
}

/// connect(2).
///
/// # Safety
/// Called by the application with connect(2)'s arguments.
#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    guard::or_else(
        "connect",
        // SAFETY: connect(2)'s arguments, as the application gave them.
        || unsafe { connect_shimmed(fd, addr, len) },
        // SAFETY: forwarded unchanged.
        || unsafe { real::connect(fd, addr, len) },
    )
}

/// # Safety
/// As [`connect`].
unsafe fn connect_shimmed(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    // SAFETY: addr/len are the application's connect(2) arguments.
    let Some((ip, port, v6)) = (unsafe { real::read_endpoint(addr, len) }) else {
        // SAFETY: forwarded unchanged.
        return unsafe { real::connect(fd, addr, len) };
    };
    if !in_overlay(ip) || state::get(fd).is_some() || !is_stream(fd) {
        // SAFETY: forwarded unchanged.
        return unsafe { real::connect(fd, addr, len) };
    }
    match accelerate_connect(fd, (ip, port, v6)) {
        Some(rc) => rc,
        // SAFETY: forwarded unchanged.
        None => unsafe { real::connect(fd, addr, len) },
    }
}

/// Returns the connect result, or None to take the normal path.
fn accelerate_connect(fd: c_int, (ip, port, v6): Endpoint) -> Option<c_int> {
    let request = SockRequest {
        op: SockOp::Connect,
        flags: if v6 { FLAG_INET6 } else { 0 },
        seq: 0,
        ip,
        port,
        backlog: 0,
    };
    let (reply, socket) = session::call(request).ok()?;
    match reply.status {
        SockStatus::Fallback => {
            debug(format_args!(
                "connect {ip}:{port}: not accelerated, overlay path"
            ));
            None
        }
        SockStatus::Error => Some(fail(reply.errno)),
        SockStatus::Ok => {
            let Some(socket) = socket else {
                return Some(fail(libc::EIO));
            };
            let nonblocking = match is_nonblocking(fd) {
                Ok(nb) => nb,
                Err(e) => return Some(fail(e)),
            };
            if let Err(e) = install(socket, fd, nonblocking) {
                return Some(fail(e));
            }
            state::insert(
                fd,
                Accelerated {
                    role: Role::Connection,
                    local: (reply.ip, reply.port),
                    peer: Some((ip, port)),
                    v6,
                    wildcard: false,
                },
            );
            debug(format_args!(
                "connect {ip}:{port}: host network, local {}:{}",
                reply.ip, reply.port
            ));
            if nonblocking {
                return Some(fail(libc::EINPROGRESS));
            }
            if !real::wait_writable(fd) {
                // Interrupted: like the kernel, the connect goes on in the background.
                return Some(fail(libc::EINTR));
            }
            match real::get_int_opt(fd, libc::SOL_SOCKET, libc::SO_ERROR) {
                Some(0) => Some(0),
                Some(err) => Some(fail(err)),
                None => Some(fail(libc::EIO)),
            }
        }
    }
}

/// listen(2).
///
/// # Safety
/// Called by the application with listen(2)'s arguments.
#[no_mangle]
pub unsafe extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    guard::or_else(
        "listen",
        // SAFETY: listen(2)'s arguments, as the application gave them.
        || unsafe { listen_shimmed(fd, backlog) },
        || real::listen(fd, backlog),
    )
}

/// # Safety
/// As [`listen`].
unsafe fn listen_shimmed(fd: c_int, backlog: c_int) -> c_int {
    if config().prefix.is_none() || state::get(fd).is_some() || !is_stream(fd) {
        return real::listen(fd, backlog);
    }
    // The kernel listens first, in the container: that binds a port if the application did not
    // (port 0), and the socket goes on taking clients that come without Freeflow, which the
    // router hands to the application through the host listener.
    let Ok(nonblocking) = is_nonblocking(fd) else {
        return real::listen(fd, backlog);
    };
    let rc = real::listen(fd, backlog);
    if rc != 0 {
        return rc;
    }
    let Some((ip, port, v6)) = bound_endpoint(fd) else {
        return 0;
    };
    // Only wildcard or overlay addresses.
    if port == 0 || !(ip.is_unspecified() || in_overlay(ip)) {
        return 0;
    }
    // A v6-only listener never takes the overlay's (IPv4) clients: it stays the kernel's and
    // must not displace an AF_INET listener on the same port.
    if v6 && real::get_int_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY).is_some_and(|v| v != 0) {
        return 0;
    }
    let mut flags = if v6 { FLAG_INET6 } else { 0 };
    if real::get_int_opt(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT).is_some_and(|v| v != 0) {
        flags |= FLAG_REUSEPORT;
    }
    let request = SockRequest {
        op: SockOp::Listen,
        flags,
        seq: 0,
        ip,
        port,
        backlog: backlog_for_router(backlog),
    };
    // SAFETY: fd is the application's open socket for the duration of the call.
    let overlay = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    // The router makes its own use of the socket non-blocking; when the application keeps it
    // (no acceleration), it gets its own mode back.
    let keep_mode = || {
        let status = real::fcntl_get(fd, libc::F_GETFL);
        if status >= 0 {
            let wanted = if nonblocking {
                status | libc::O_NONBLOCK
            } else {
                status & !libc::O_NONBLOCK
            };
            real::fcntl_set(fd, libc::F_SETFL, wanted);
        }
    };
    let Ok((reply, socket)) = session::call_passing(request, overlay) else {
        keep_mode();
        return 0;
    };
    match (reply.status, socket) {
        (SockStatus::Ok, Some(socket)) => {
            // The application's socket stays the overlay listener for clients without
            // Freeflow; the shim keeps a duplicate to accept them from.
            overlay_accept::keep(fd, (reply.ip, reply.port), backlog);
            if let Err(e) = install(socket, fd, nonblocking) {
                overlay_accept::release((reply.ip, reply.port));
                return fail(e);
            }
            state::insert(
                fd,
                Accelerated {
                    role: Role::Listener,
                    local: (reply.ip, reply.port),
                    peer: None,
                    v6,
                    wildcard: ip.is_unspecified(),
                },
            );
            debug(format_args!(
                "listen {}:{}: host network",
                reply.ip, reply.port
            ));
            session::ensure_watcher();
            // Registered in epoll before it listened: its overlay listener is watched too.
            for local in epoll::mirror_registered(fd) {
                overlay_accept::announce_accepting(local);
            }
            0
        }
        (SockStatus::Error, _) => {
            keep_mode();
            fail(reply.errno)
        }
        _ => {
            keep_mode();
            0
        }
    }
}

/// The address `fd` is bound to, as the kernel says.
fn bound_endpoint(fd: c_int) -> Option<Endpoint> {
    let (_, bound) = with_address_out(|addr, len| {
        // SAFETY: `addr` is a buffer of `*len` bytes.
        unsafe { real::getsockname(fd, addr, len) }
    });
    bound
}

/// Runs a call that writes an address into a buffer it is given (getsockname, accept): `call`
/// gets a zeroed `sockaddr_storage` and its length. Returns the call's result and, if it
/// succeeded, the endpoint it wrote (None for an address that is not IPv4).
fn with_address_out(
    call: impl FnOnce(*mut sockaddr, *mut socklen_t) -> c_int,
) -> (c_int, Option<Endpoint>) {
    // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as socklen_t;
    let rc = call(
        (&mut storage as *mut libc::sockaddr_storage).cast(),
        &mut len,
    );
    // SAFETY: the call succeeded, so the kernel filled `len` bytes of storage.
    let endpoint = (rc >= 0)
        .then(|| unsafe {
            real::read_endpoint((&storage as *const libc::sockaddr_storage).cast(), len)
        })
        .flatten();
    (rc, endpoint)
}

/// accept(2) (guarded in accept4).
///
/// # Safety
/// Called by the application with accept(2)'s arguments.
#[no_mangle]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: same contract.
    unsafe { accept4(fd, addr, len, 0) }
}

/// accept4(2).
///
/// # Safety
/// Called by the application with accept4(2)'s arguments.
#[no_mangle]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    guard::or_else(
        "accept4",
        // SAFETY: accept4(2)'s arguments, as the application gave them.
        || unsafe { accept4_shimmed(fd, addr, len, flags) },
        // SAFETY: forwarded unchanged.
        || unsafe { real::accept4(fd, addr, len, flags) },
    )
}

/// # Safety
/// As [`accept4`].
unsafe fn accept4_shimmed(
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    let Some(listener) = state::get(fd).filter(|s| s.role == Role::Listener) else {
        // SAFETY: forwarded unchanged.
        return unsafe { real::accept4(fd, addr, len, flags) };
    };
    // A forked or exec'd server's first accept: it needs its own watcher.
    session::ensure_watcher();
    // Clients without Freeflow wait on the shim's overlay listener: a blocking accept waits on
    // it too, and a non-blocking one looks there before saying EAGAIN (overlay_accept).
    let blocking = is_nonblocking(fd) == Ok(false);
    loop {
        let overlay = state::overlay_of(listener.local);
        if let Some(overlay) = overlay.filter(|_| blocking) {
            match overlay_accept::wait_either(fd, overlay, listener.local) {
                overlay_accept::Ready::Overlay => {
                    // SAFETY: addr/len are the application's accept arguments (NULL allowed).
                    match unsafe { overlay_accept::take(listener.local, overlay, addr, len, flags) }
                    {
                        Ok(Some(client)) => return client,
                        // Another thread or process took it: wait again.
                        Ok(None) => continue,
                        Err(e) => return fail(e),
                    }
                }
                overlay_accept::Ready::Failed(e) => return fail(e),
                overlay_accept::Ready::Host => {}
            }
        }
        let (new, host_peer) = with_address_out(|peer, peer_len| {
            // SAFETY: `peer` is a buffer of `*peer_len` bytes.
            unsafe { real::accept4(fd, peer, peer_len, flags) }
        });
        if new < 0 {
            let err = real::errno();
            if let Some(overlay) = overlay.filter(|_| err == libc::EAGAIN && !blocking) {
                // SAFETY: addr/len are the application's accept arguments (NULL allowed).
                match unsafe { overlay_accept::take(listener.local, overlay, addr, len, flags) } {
                    Ok(Some(client)) => return client,
                    Ok(None) => return fail(libc::EAGAIN),
                    Err(e) => return fail(e),
                }
            }
            return new;
        }
        if let Some((_, port, _)) = host_peer.filter(|(ip, ..)| overlay_accept::is_doorbell(*ip)) {
            // A client without Freeflow waits on the overlay listener: the application gets
            // its own connection and address, as the kernel gives them.
            // SAFETY: addr/len are the application's accept arguments (NULL allowed).
            match unsafe { overlay_accept::answer(listener.local, new, port, addr, len, flags) } {
                Ok(Some(client)) => return client,
                Ok(None) => continue,
                Err(e) => return fail(e),
            }
        }
        let overlay_peer = host_peer.and_then(|(ip, port, _)| {
            // The router's notice usually comes before the connection: no round trip.
            if let Some(found) = session::noticed((ip, port)) {
                return Some(found);
            }
            let request = SockRequest {
                op: SockOp::Resolve,
                flags: 0,
                seq: 0,
                ip,
                port,
                backlog: 0,
            };
            match session::call(request) {
                Ok((reply, _)) if reply.status == SockStatus::Ok => Some((reply.ip, reply.port)),
                _ => None,
            }
        });
        let Some((peer_ip, peer_port)) = overlay_peer else {
            // Not announced by any router: someone on the host network reached the listener
            // directly. Containers only see connections made through Freeflow.
            debug(format_args!(
                "dropped an unannounced connection from {host_peer:?}"
            ));
            real::close(new);
            continue;
        };
        state::insert(
            new,
            Accelerated {
                role: Role::Connection,
                local: listener.local,
                peer: Some((peer_ip, peer_port)),
                v6: listener.v6,
                wildcard: false,
            },
        );
        // SAFETY: addr/len are the application's accept arguments (NULL allowed).
        unsafe { real::write_endpoint(addr, len, peer_ip, peer_port, listener.v6) };
        return new;
    }
}

/// getsockname(2).
///
/// # Safety
/// Called by the application with getsockname(2)'s arguments.
#[no_mangle]
pub unsafe extern "C" fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    guard::or_else(
        "getsockname",
        // SAFETY: getsockname(2)'s arguments, as the application gave them.
        || unsafe { getsockname_shimmed(fd, addr, len) },
        // SAFETY: forwarded unchanged.
        || unsafe { real::getsockname(fd, addr, len) },
    )
}

/// # Safety
/// As [`getsockname`].
unsafe fn getsockname_shimmed(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    if let Some(s) = state::get(fd) {
        let (ip, port) = s.name();
        // SAFETY: the application's getsockname arguments.
        if unsafe { real::write_endpoint(addr, len, ip, port, s.v6) } {
            return 0;
        }
        return fail(libc::EFAULT);
    }
    // SAFETY: forwarded unchanged.
    unsafe { real::getsockname(fd, addr, len) }
}

/// getpeername(2).
///
/// # Safety
/// Called by the application with getpeername(2)'s arguments.
#[no_mangle]
pub unsafe extern "C" fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    guard::or_else(
        "getpeername",
        // SAFETY: getpeername(2)'s arguments, as the application gave them.
        || unsafe { getpeername_shimmed(fd, addr, len) },
        // SAFETY: forwarded unchanged.
        || unsafe { real::getpeername(fd, addr, len) },
    )
}

/// # Safety
/// As [`getpeername`].
unsafe fn getpeername_shimmed(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    if let Some(s) = state::get(fd) {
        let Some((ip, port)) = s.peer else {
            return fail(libc::ENOTCONN);
        };
        // A connection still being set up has no peer yet, as the kernel would say.
        // SAFETY: forwarded unchanged, only to ask the kernel whether it is connected.
        let connected = unsafe { real::getpeername(fd, addr, len) } == 0;
        if !connected {
            return -1;
        }
        // SAFETY: the application's getpeername arguments.
        unsafe { real::write_endpoint(addr, len, ip, port, s.v6) };
        return 0;
    }
    // SAFETY: forwarded unchanged.
    unsafe { real::getpeername(fd, addr, len) }
}

/// close(2).
///
/// # Safety
/// Called by the application with close(2)'s argument.
#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if private::is_held(fd) {
        // The shim's own descriptor (the router connection): the application never opened
        // this number, as far as it knows (a daemon closing every fd, for instance).
        real::set_errno(libc::EBADF);
        return -1;
    }
    guard::or_else(
        "close",
        || {
            epoll::closing(fd);
            epoll::closed(fd);
            unlisten_if_last(state::remove(fd));
            real::close(fd)
        },
        || real::close(fd),
    )
}

/// close_range(2): closes (or, with CLOSE_RANGE_CLOEXEC, marks close-on-exec) the
/// application's fds from `first` to `last`, around the shim's own (see `private`); the
/// accelerated sockets among them are closed as close() would.
///
/// # Safety
/// Called by the application with close_range(2)'s arguments.
#[no_mangle]
pub unsafe extern "C" fn close_range(
    first: libc::c_uint,
    last: libc::c_uint,
    flags: c_int,
) -> c_int {
    // What the kernel refuses, it refuses before closing anything: the shim does the same.
    if first > last {
        real::set_errno(libc::EINVAL);
        return -1;
    }
    let (first, last) = (clamp_fd(first), clamp_fd(last));
    guard::or_else(
        "close_range",
        || {
            if flags & CLOSE_RANGE_CLOEXEC == 0 {
                epoll::closing_range(first, last);
            }
            let rc = real::close_range_around(first, last, flags, &private::held_in(first, last));
            if rc == 0 && flags & CLOSE_RANGE_CLOEXEC == 0 {
                epoll::closed_range(first, last);
                let closed = state::remove_range(first, last);
                for s in closed {
                    unlisten_if_last(Some(s));
                }
            }
            rc
        },
        || real::close_range_around(first, last, flags, &private::held_in(first, last)),
    )
}

/// Linux's CLOSE_RANGE_CLOEXEC (linux/close_range.h): mark instead of close.
const CLOSE_RANGE_CLOEXEC: c_int = 1 << 2;

/// An fd bound given as an unsigned int (close_range takes ~0U for "every fd"), as a
/// non-negative c_int.
fn clamp_fd(fd: libc::c_uint) -> c_int {
    c_int::try_from(fd).unwrap_or(c_int::MAX)
}

/// closefrom(3): every fd from `low` up, as close_range(low, ~0U, 0).
///
/// # Safety
/// Called by the application with closefrom(3)'s argument.
#[no_mangle]
pub unsafe extern "C" fn closefrom(low: c_int) {
    let first = libc::c_uint::try_from(low.max(0)).unwrap_or(0);
    // SAFETY: close_range's contract holds: plain numbers.
    unsafe {
        close_range(first, libc::c_uint::MAX, 0);
    }
}

/// The backlog the router is told for an application's listen(fd, `backlog`). Linux reads a
/// negative backlog as unsigned, so as its maximum (net.core.somaxconn): `listen(fd, -1)` asks
/// for the largest queue, and the router clamps what it is told.
fn backlog_for_router(backlog: c_int) -> u32 {
    u32::try_from(backlog).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod backlog_tests {
    use super::backlog_for_router;

    #[test]
    fn a_negative_backlog_asks_for_the_largest_queue_as_the_kernel_reads_it() {
        assert_eq!(backlog_for_router(-1), u32::MAX);
        assert_eq!(backlog_for_router(i32::MIN), u32::MAX);
        assert_eq!(backlog_for_router(0), 0);
        assert_eq!(backlog_for_router(511), 511);
    }
}

/// Runs `call`, the C library's call that makes fd `made` (dup, dup2, dup3, fcntl,
/// epoll_create), then `bookkeeping` with its result, behind the guard: after a panic, the
/// call's result stands (without the bookkeeping), or the call is made if it was not.
fn made_then(
    name: &str,
    call: impl Fn() -> c_int,
    bookkeeping: impl FnOnce(c_int) -> c_int,
) -> c_int {
    let made = Cell::new(None);
    guard::or_else(
        name,
        || {
            let rc = call();
            made.set(Some(rc));
            bookkeeping(rc)
        },
        || made.get().unwrap_or_else(&call),
    )
}

/// dup2(2): the new fd refers to the same socket, so it carries the same overlay addresses.
///
/// # Safety
/// Called by the application with dup2(2)'s arguments.
#[no_mangle]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    if old == new {
        // dup2 of an fd onto itself checks validity and does nothing (dup3 refuses it).
        return if real::fcntl_get(old, libc::F_GETFD) < 0 {
            -1
        } else {
            new
        };
    }
    // SAFETY: same contract (old != new, so dup3 does what dup2 does).
    unsafe { dup3(old, new, 0) }
}

/// After an fd was closed, or replaced by dup2/dup3 (`replaced`: what it was): if it was the
/// process's last fd for an accelerated listener, the router is told the listener is closed.
fn unlisten_if_last(replaced: Option<Accelerated>) {
    let Some(s) = replaced.filter(|s| s.role == Role::Listener) else {
        return;
    };
    // Another fd of this process (a dup) may still hold the listener.
    if state::holds_listener(s.local) {
        return;
    }
    overlay_accept::release(s.local);
    let request = SockRequest {
        op: SockOp::Unlisten,
        // Another process may hold it without having told the router yet.
        flags: if state::forked() { FLAG_ORPHAN } else { 0 },
        seq: 0,
        ip: s.local.0,
        port: s.local.1,
        backlog: 0,
    };
    let _ = session::call(request);
}

/// dup3(2).
///
/// # Safety
/// Called by the application with dup3(2)'s arguments.
#[no_mangle]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    if old != new && !private::make_room(new) {
        // The shim's descriptor at `new` could not move: no free number.
        real::set_errno(libc::EMFILE);
        return -1;
    }
    let replaced = Cell::new(None);
    made_then(
        "dup3",
        || {
            replaced.set((old != new).then(|| state::get(new)).flatten());
            if old != new {
                epoll::closing(new);
            }
            real::dup3(old, new, flags)
        },
        |rc| {
            if rc >= 0 {
                epoll::closed(new);
                state::copy(old, new);
                unlisten_if_last(replaced.get());
            }
            rc
        },
    )
}

/// dup(2).
///
/// # Safety
/// Called by the application with dup(2)'s argument.
#[no_mangle]
pub unsafe extern "C" fn dup(old: c_int) -> c_int {
    made_then(
        "dup",
        || real::dup(old),
        |new| {
            if new >= 0 {
                state::copy(old, new);
            }
            new
        },
    )
}

/// fcntl(2): F_DUPFD and F_DUPFD_CLOEXEC make another fd for the same socket; every other
/// command goes to the C library as it came.
///
/// fcntl is variadic in C; on the platforms this library builds for, a variadic call passes
/// its third argument in the same register as a fixed one, so a word-sized parameter receives
/// it whether it is an int or a pointer (and an unused one is ignored by the kernel).
///
/// # Safety
/// Called by the application with fcntl(2)'s arguments.
#[no_mangle]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: libc::c_ulong) -> c_int {
    made_then(
        "fcntl",
        // SAFETY: forwarded as it came.
        || unsafe { real::fcntl(fd, cmd, arg) },
        |rc| {
            if rc >= 0 && (cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC) {
                state::copy(fd, rc);
            }
            rc
        },
    )
}

/// fcntl64: the name programs built with 64-bit file offsets call (guarded in fcntl).
///
/// # Safety
/// As [`fcntl`].
#[no_mangle]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: libc::c_ulong) -> c_int {
    // SAFETY: same contract.
    unsafe { fcntl(fd, cmd, arg) }
}

/// epoll_create(2): remembered, so registrations survive the swap to a host socket.
///
/// # Safety
/// Called by the application with epoll_create(2)'s argument.
#[no_mangle]
pub unsafe extern "C" fn epoll_create(size: c_int) -> c_int {
    if size <= 0 {
        return fail(libc::EINVAL);
    }
    made_then("epoll_create", || real::epoll_create1(0), epoll_created)
}

fn epoll_created(epfd: c_int) -> c_int {
    epoll::created(epfd);
    epfd
}

/// epoll_create1(2).
///
/// # Safety
/// Called by the application with epoll_create1(2)'s argument.
#[no_mangle]
pub unsafe extern "C" fn epoll_create1(flags: c_int) -> c_int {
    made_then(
        "epoll_create1",
        || real::epoll_create1(flags),
        epoll_created,
    )
}

/// epoll_ctl(2): the shim's overlay listener of an accelerated listener follows the
/// listener's registration (see `epoll`).
///
/// # Safety
/// Called by the application with epoll_ctl(2)'s arguments.
#[no_mangle]
pub unsafe extern "C" fn epoll_ctl(
    epfd: c_int,
    op: c_int,
    fd: c_int,
    event: *mut libc::epoll_event,
) -> c_int {
    // SAFETY: forwarded unchanged.
    let rc = unsafe { real::epoll_ctl(epfd, op, fd, event) };
    if rc != 0 || !state::in_use() {
        return rc;
    }
    let errno = real::errno();
    guard::or_else(
        "epoll_ctl",
        || {
            // SAFETY: the kernel just read this event (ADD, MOD); read unaligned: the structure
            // is packed on x86_64.
            let read = (!event.is_null()).then(|| unsafe { std::ptr::read_unaligned(event) });
            let watched = epoll::after_ctl(epfd, op, fd, read.map(|e| (e.events, e.u64)));
            if let Some(local) = watched {
                overlay_accept::announce_accepting(local);
            }
        },
        || {},
    );
    real::set_errno(errno);
    rc
}

/// poll(2): an accelerated listener's clients without Freeflow make it ready too (see
/// `overlay_accept::poll_with_overlays`).
///
/// # Safety
/// Called by the application with poll(2)'s arguments.
#[no_mangle]
pub unsafe extern "C" fn poll(fds: *mut libc::pollfd, nfds: libc::nfds_t, timeout: c_int) -> c_int {
    // SAFETY: forwarded, the array possibly extended by the shim's own entries.
    let wait = |fds, nfds| unsafe { real::poll_raw(fds, nfds, timeout) };
    guard::or_else(
        "poll",
        // SAFETY: poll(2)'s arguments, as the application gave them.
        || unsafe { overlay_accept::poll_with_overlays(fds, nfds, wait) },
        || wait(fds, nfds),
    )
}

/// __poll_chk: the name fortified programs call poll by (the size check is the C library's).
///
/// # Safety
/// As [`poll`]; `fds_len` is the size of the array `fds` points at.
#[no_mangle]
pub unsafe extern "C" fn __poll_chk(
    fds: *mut libc::pollfd,
    nfds: libc::nfds_t,
    timeout: c_int,
    fds_len: libc::size_t,
) -> c_int {
    if fds_len / std::mem::size_of::<libc::pollfd>() < nfds as usize {
        // As the C library's check does: the program is broken.
        std::process::abort();
    }
    // SAFETY: same contract.
    unsafe { poll(fds, nfds, timeout) }
}

/// ppoll(2), as [`poll`].
///
/// # Safety
/// Called by the application with ppoll(2)'s arguments.
#[no_mangle]
pub unsafe extern "C" fn ppoll(
    fds: *mut libc::pollfd,
    nfds: libc::nfds_t,
    timeout: *const libc::timespec,
    sigmask: *const libc::sigset_t,
) -> c_int {
    // SAFETY: forwarded, the array possibly extended by the shim's own entries.
    let wait = |fds, nfds| unsafe { real::ppoll(fds, nfds, timeout, sigmask) };
    guard::or_else(
        "ppoll",
        // SAFETY: ppoll(2)'s arguments, as the application gave them.
        || unsafe { overlay_accept::poll_with_overlays(fds, nfds, wait) },
        || wait(fds, nfds),
    )
}

/// __ppoll_chk, as [`__poll_chk`].
///
/// # Safety
/// As [`ppoll`]; `fds_len` is the size of the array `fds` points at.
#[no_mangle]
pub unsafe extern "C" fn __ppoll_chk(
    fds: *mut libc::pollfd,
    nfds: libc::nfds_t,
    timeout: *const libc::timespec,
    sigmask: *const libc::sigset_t,
    fds_len: libc::size_t,
) -> c_int {
    if fds_len / std::mem::size_of::<libc::pollfd>() < nfds as usize {
        std::process::abort();
    }
    // SAFETY: same contract.
    unsafe { ppoll(fds, nfds, timeout, sigmask) }
}

/// select(2): an accelerated listener's clients without Freeflow make it readable too (see
/// `overlay_accept::select_with_overlays`).
///
/// # Safety
/// Called by the application with select(2)'s arguments.
#[no_mangle]
pub unsafe extern "C" fn select(
    nfds: c_int,
    read: *mut libc::fd_set,
    write: *mut libc::fd_set,
    except: *mut libc::fd_set,
    timeout: *mut libc::timeval,
) -> c_int {
    let sets = overlay_accept::FdSets {
        read,
        write,
        except,
    };
    // SAFETY: the application's sets, or the shim's full-size copies of them with the shim's
    // own fds added, and the application's timeout.
    let wait = |nfds, sets: overlay_accept::FdSets| unsafe {
        real::select(nfds, sets.read, sets.write, sets.except, timeout)
    };
    guard::or_else(
        "select",
        // SAFETY: select(2)'s arguments, as the application gave them.
        || unsafe { overlay_accept::select_with_overlays(nfds, sets, wait) },
        || wait(nfds, sets),
    )
}

/// pselect(2), as [`select`].
///
/// # Safety
/// Called by the application with pselect(2)'s arguments.
#[no_mangle]
pub unsafe extern "C" fn pselect(
    nfds: c_int,
    read: *mut libc::fd_set,
    write: *mut libc::fd_set,
    except: *mut libc::fd_set,
    timeout: *const libc::timespec,
    sigmask: *const libc::sigset_t,
) -> c_int {
    let sets = overlay_accept::FdSets {
        read,
        write,
        except,
    };
    // SAFETY: as in select.
    let wait = |nfds, sets: overlay_accept::FdSets| unsafe {
        real::pselect(nfds, sets.read, sets.write, sets.except, timeout, sigmask)
    };
    guard::or_else(
        "pselect",
        // SAFETY: pselect(2)'s arguments, as the application gave them.
        || unsafe { overlay_accept::select_with_overlays(nfds, sets, wait) },
        || wait(nfds, sets),
    )
}

extern "C" {
    static environ: *const *const libc::c_char;
}

/// A C string argument: a path or a file name.
type CStrArg = *const libc::c_char;
/// A NULL-terminated array of C strings: `argv` or `envp`.
type CStrArray = *const *const libc::c_char;

/// execve(2): accelerated sockets that survive the exec keep their overlay addresses.
///
/// # Safety
/// Called by the application with execve(2)'s arguments.
#[no_mangle]
pub unsafe extern "C" fn execve(path: CStrArg, argv: CStrArray, envp: CStrArray) -> c_int {
    guard::or_else(
        "execve",
        // SAFETY: execve's arguments, passed on (the environment with our variable added).
        || unsafe { crate::inherit::with_inherited_fds(envp, |env| real::execve(path, argv, env)) },
        // SAFETY: forwarded unchanged (the sockets lose their overlay names).
        || unsafe { real::execve(path, argv, envp) },
    )
}

/// execvpe(3).
///
/// # Safety
/// Called by the application with execvpe(3)'s arguments.
#[no_mangle]
pub unsafe extern "C" fn execvpe(file: CStrArg, argv: CStrArray, envp: CStrArray) -> c_int {
    guard::or_else(
        "execvpe",
        // SAFETY: execvpe's arguments, passed on (the environment with our variable added).
        || unsafe {
            crate::inherit::with_inherited_fds(envp, |env| real::execvpe(file, argv, env))
        },
        // SAFETY: forwarded unchanged (the sockets lose their overlay names).
        || unsafe { real::execvpe(file, argv, envp) },
    )
}

/// execv(3) (guarded in execve).
///
/// # Safety
/// Called by the application with execv(3)'s arguments.
#[no_mangle]
pub unsafe extern "C" fn execv(path: CStrArg, argv: CStrArray) -> c_int {
    // SAFETY: environ is the process's environment, valid here.
    unsafe { execve(path, argv, environ) }
}

/// execvp(3) (guarded in execvpe).
///
/// # Safety
/// Called by the application with execvp(3)'s arguments.
#[no_mangle]
pub unsafe extern "C" fn execvp(file: CStrArg, argv: CStrArray) -> c_int {
    // SAFETY: environ is the process's environment, valid here.
    unsafe { execvpe(file, argv, environ) }
}

/// Defines posix_spawn(3) and posix_spawnp(3): they take the same arguments and differ only in
/// whether `path` is looked up in PATH (`search`), so one body serves both.
macro_rules! spawn_passing_sockets {
    ($($(#[$doc:meta])* $name:ident, search: $search:literal;)*) => {$(
        $(#[$doc])*
        ///
        /// # Safety
        /// Called by the application with posix_spawn(3)'s arguments.
        #[no_mangle]
        pub unsafe extern "C" fn $name(
            pid: *mut libc::pid_t,
            path: *const libc::c_char,
            file_actions: *const libc::posix_spawn_file_actions_t,
            attr: *const libc::posix_spawnattr_t,
            argv: *const *mut libc::c_char,
            envp: *const *mut libc::c_char,
        ) -> c_int {
            guard::or_else(
                stringify!($name),
                // SAFETY: posix_spawn's arguments, passed on (the environment with our variable
                // added; the C prototype's pointers to mutable strings are not written
                // through).
                || unsafe {
                    crate::inherit::with_inherited_fds(envp.cast(), |env| {
                        real::posix_spawn($search, pid, path, file_actions, attr, argv, env.cast())
                    })
                },
                // SAFETY: forwarded unchanged (the sockets lose their overlay names).
                || unsafe { real::posix_spawn($search, pid, path, file_actions, attr, argv, envp) },
            )
        }
    )*};
}

spawn_passing_sockets! {
    /// posix_spawn(3): like execve, the new program gets the table of the accelerated sockets
    /// it inherits. (glibc's posix_spawn calls its internal execve, which the shim cannot see.)
    posix_spawn, search: false;
    /// posix_spawnp(3), as [`posix_spawn`].
    posix_spawnp, search: true;
}
