//! The rsocket API of librdmacm as C functions (rsocket.h's names, version RDMACM_1.0): each
//! reads its arguments (addresses, iovecs, fd_sets, option values), runs under [`int`] or
//! [`size`] (-1 and errno on failure, a debug line with FREEFLOW_DEBUG=1, a panic turned into
//! EIO) and leaves the work to [`crate::rsocket`], riomap, riounmap and riowrite included.
#![allow(unsafe_code)]

use crate::cm::{read_sockaddr, Fail};
use crate::rsocket::{self, RSocket};
use freeflow_os::errno::set_errno;
use std::ffi::{c_int, c_long, c_void};
use std::net::SocketAddrV4;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

symbol_versions! {
    "RDMACM_1.0": [
        raccept, rbind, rclose, rconnect, rfcntl, rgetpeername, rgetsockname, rgetsockopt,
        riomap, riounmap, riowrite, rlisten, rpoll, rread, rreadv, rrecv, rrecvfrom, rrecvmsg,
        rselect, rsend, rsendmsg, rsendto, rsetsockopt, rshutdown, rsocket, rwrite, rwritev,
    ],
}

/// Errors a program expects in its normal course (no debug line for them).
fn quiet(errno: i32) -> bool {
    matches!(errno, libc::EAGAIN | libc::EINPROGRESS | libc::EINTR)
}

fn fail(name: &str, e: &Fail) {
    if !quiet(e.errno) {
        crate::debug(format_args!(
            "{name}: {} ({})",
            e.why,
            std::io::Error::from_raw_os_error(e.errno)
        ));
    }
    set_errno(e.errno);
}

fn int(name: &str, f: impl FnOnce() -> Result<c_int, Fail>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            fail(name, &e);
            -1
        }
        Err(_) => {
            set_errno(libc::EIO);
            -1
        }
    }
}

fn size(name: &str, f: impl FnOnce() -> Result<usize, Fail>) -> isize {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => isize::try_from(v).unwrap_or(isize::MAX),
        Ok(Err(e)) => {
            fail(name, &e);
            -1
        }
        Err(_) => {
            set_errno(libc::EIO);
            -1
        }
    }
}

fn addr_in(addr: *const libc::sockaddr, len: libc::socklen_t) -> Result<SocketAddrV4, Fail> {
    if addr.is_null() || (len as usize) < std::mem::size_of::<libc::sockaddr_in>() {
        return Err(Fail::new(libc::EINVAL, "no address, or a short one"));
    }
    read_sockaddr(addr)?.ok_or_else(|| Fail::new(libc::EAFNOSUPPORT, "no address family"))
}

/// Writes `a` as the socket's family names it into (addr, *len), truncating as getsockname
/// does; `*len` gets the full length.
fn addr_out(
    family: c_int,
    a: Option<SocketAddrV4>,
    addr: *mut libc::sockaddr,
    len: *mut libc::socklen_t,
) -> Result<(), Fail> {
    if addr.is_null() || len.is_null() {
        return Ok(());
    }
    let a = a.unwrap_or(SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0));
    let mut bytes = Vec::new();
    if family == libc::AF_INET6 {
        let sin6 = libc::sockaddr_in6 {
            sin6_family: libc::AF_INET6 as libc::sa_family_t,
            sin6_port: a.port().to_be(),
            sin6_flowinfo: 0,
            sin6_addr: libc::in6_addr {
                s6_addr: a.ip().to_ipv6_mapped().octets(),
            },
            sin6_scope_id: 0,
        };
        // SAFETY: plain data viewed as its bytes.
        bytes.extend_from_slice(unsafe {
            std::slice::from_raw_parts(
                (&sin6 as *const libc::sockaddr_in6).cast::<u8>(),
                std::mem::size_of_val(&sin6),
            )
        });
    } else {
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: as above.
        bytes.extend_from_slice(unsafe {
            std::slice::from_raw_parts(
                (&sin as *const libc::sockaddr_in).cast::<u8>(),
                std::mem::size_of_val(&sin),
            )
        });
    }
    // SAFETY: the program's socklen_t.
    let room = unsafe { *len } as usize;
    let n = room.min(bytes.len());
    // SAFETY: the program passes `*len` writable bytes at addr.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr.cast::<u8>(), n);
        *len = bytes.len() as libc::socklen_t;
    }
    Ok(())
}

fn sock(fd: c_int) -> Result<std::sync::Arc<RSocket>, Fail> {
    rsocket::get(fd)
}

// ---- setup ----

#[no_mangle]
pub extern "C" fn rsocket(domain: c_int, kind: c_int, protocol: c_int) -> c_int {
    int("rsocket", || rsocket::socket(domain, kind, protocol))
}

#[no_mangle]
pub extern "C" fn rbind(fd: c_int, addr: *const libc::sockaddr, len: libc::socklen_t) -> c_int {
    int("rbind", || {
        sock(fd)?.bind(addr_in(addr, len)?)?;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn rlisten(fd: c_int, backlog: c_int) -> c_int {
    int("rlisten", || {
        sock(fd)?.listen(backlog)?;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn raccept(
    fd: c_int,
    addr: *mut libc::sockaddr,
    len: *mut libc::socklen_t,
) -> c_int {
    int("raccept", || {
        let rs = sock(fd)?;
        let (new, remote) = rs.accept()?;
        addr_out(rs.family, remote, addr, len)?;
        Ok(new)
    })
}

#[no_mangle]
pub extern "C" fn rconnect(fd: c_int, addr: *const libc::sockaddr, len: libc::socklen_t) -> c_int {
    int("rconnect", || {
        sock(fd)?.connect(addr_in(addr, len)?)?;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn rshutdown(fd: c_int, how: c_int) -> c_int {
    int("rshutdown", || {
        sock(fd)?.shutdown(how)?;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn rclose(fd: c_int) -> c_int {
    int("rclose", || {
        rsocket::close(fd)?;
        Ok(0)
    })
}

// ---- data ----

/// The program's iovecs as byte slices (NULL bases with length 0 allowed).
///
/// # Safety
/// `iov` holds `n` iovecs, each naming `iov_len` bytes the program lets us use for the call.
unsafe fn iovecs<'a>(iov: *const libc::iovec, n: c_int) -> Result<Vec<&'a mut [u8]>, Fail> {
    let n = usize::try_from(n).map_err(|_| Fail::new(libc::EINVAL, "negative iovcnt"))?;
    if n > 1024 {
        return Err(Fail::new(libc::EINVAL, "iovcnt beyond IOV_MAX"));
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    if iov.is_null() {
        return Err(Fail::new(libc::EFAULT, "iov is NULL"));
    }
    // SAFETY: the caller's promise.
    let list = unsafe { std::slice::from_raw_parts(iov, n) };
    let mut out = Vec::with_capacity(n);
    for v in list {
        if v.iov_len == 0 {
            continue;
        }
        if v.iov_base.is_null() {
            return Err(Fail::new(libc::EFAULT, "an iovec's base is NULL"));
        }
        // SAFETY: the caller's promise.
        out.push(unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len) });
    }
    Ok(out)
}

fn one<'a>(buf: *const c_void, len: usize) -> Result<Vec<&'a mut [u8]>, Fail> {
    if len == 0 {
        return Ok(Vec::new());
    }
    if buf.is_null() {
        return Err(Fail::new(libc::EFAULT, "buffer is NULL"));
    }
    // SAFETY: the program passes `len` bytes at buf.
    Ok(vec![unsafe {
        std::slice::from_raw_parts_mut(buf as *mut u8, len)
    }])
}

/// Receive flags: PEEK, DONTWAIT and WAITALL are served; out-of-band data does not exist
/// here; others (NOSIGNAL, CMSG_CLOEXEC...) change nothing on a stream of ours.
fn recv_flags(flags: c_int) -> Result<(bool, bool, bool), Fail> {
    if flags & libc::MSG_OOB != 0 {
        return Err(Fail::new(
            libc::EOPNOTSUPP,
            "rsockets have no out-of-band data",
        ));
    }
    Ok((
        flags & libc::MSG_PEEK != 0,
        flags & libc::MSG_DONTWAIT != 0,
        flags & libc::MSG_WAITALL != 0,
    ))
}

fn do_recv(fd: c_int, mut bufs: Vec<&mut [u8]>, flags: c_int) -> Result<usize, Fail> {
    let (peek, dontwait, waitall) = recv_flags(flags)?;
    let rs = sock(fd)?;
    if bufs.is_empty() {
        return Ok(0);
    }
    rs.recv(&mut bufs, peek, dontwait, waitall)
}

fn do_send(fd: c_int, bufs: Vec<&mut [u8]>, flags: c_int) -> Result<usize, Fail> {
    // DONTWAIT is served; no SIGPIPE is ever raised (as with NOSIGNAL); MORE, EOR and the
    // like change nothing on a stream of ours; out-of-band data does not exist here.
    if flags & libc::MSG_OOB != 0 {
        return Err(Fail::new(
            libc::EOPNOTSUPP,
            "rsockets have no out-of-band data",
        ));
    }
    let rs = sock(fd)?;
    if bufs.is_empty() {
        return Ok(0);
    }
    let bufs: Vec<&[u8]> = bufs.into_iter().map(|b| &*b).collect();
    rs.send(&bufs, flags & libc::MSG_DONTWAIT != 0)
}

#[no_mangle]
pub extern "C" fn rrecv(fd: c_int, buf: *mut c_void, len: usize, flags: c_int) -> isize {
    size("rrecv", || do_recv(fd, one(buf, len)?, flags))
}

#[no_mangle]
pub extern "C" fn rrecvfrom(
    fd: c_int,
    buf: *mut c_void,
    len: usize,
    flags: c_int,
    src: *mut libc::sockaddr,
    src_len: *mut libc::socklen_t,
) -> isize {
    size("rrecvfrom", || {
        let n = do_recv(fd, one(buf, len)?, flags)?;
        let rs = sock(fd)?;
        addr_out(rs.family, rs.names().1, src, src_len)?;
        Ok(n)
    })
}

#[no_mangle]
pub extern "C" fn rrecvmsg(fd: c_int, msg: *mut libc::msghdr, flags: c_int) -> isize {
    size("rrecvmsg", || {
        if msg.is_null() {
            return Err(Fail::new(libc::EFAULT, "msg is NULL"));
        }
        // SAFETY: the program's msghdr.
        let m = unsafe { &mut *msg };
        // SAFETY: the msghdr's iovecs.
        let bufs = unsafe { iovecs(m.msg_iov, m.msg_iovlen as c_int)? };
        m.msg_controllen = 0;
        m.msg_flags = 0;
        let n = do_recv(fd, bufs, flags)?;
        if !m.msg_name.is_null() {
            let rs = sock(fd)?;
            addr_out(
                rs.family,
                rs.names().1,
                m.msg_name.cast(),
                &mut m.msg_namelen,
            )?;
        }
        Ok(n)
    })
}

#[no_mangle]
pub extern "C" fn rread(fd: c_int, buf: *mut c_void, len: usize) -> isize {
    size("rread", || do_recv(fd, one(buf, len)?, 0))
}

#[no_mangle]
pub extern "C" fn rreadv(fd: c_int, iov: *const libc::iovec, n: c_int) -> isize {
    // SAFETY: the program's iovecs.
    size("rreadv", || do_recv(fd, unsafe { iovecs(iov, n)? }, 0))
}

#[no_mangle]
pub extern "C" fn rsend(fd: c_int, buf: *const c_void, len: usize, flags: c_int) -> isize {
    size("rsend", || do_send(fd, one(buf, len)?, flags))
}

#[no_mangle]
pub extern "C" fn rsendto(
    fd: c_int,
    buf: *const c_void,
    len: usize,
    flags: c_int,
    _dst: *const libc::sockaddr,
    _dst_len: libc::socklen_t,
) -> isize {
    // A stream socket ignores the destination, as TCP does once connected.
    size("rsendto", || do_send(fd, one(buf, len)?, flags))
}

#[no_mangle]
pub extern "C" fn rsendmsg(fd: c_int, msg: *const libc::msghdr, flags: c_int) -> isize {
    size("rsendmsg", || {
        if msg.is_null() {
            return Err(Fail::new(libc::EFAULT, "msg is NULL"));
        }
        // SAFETY: the program's msghdr.
        let m = unsafe { &*msg };
        // SAFETY: the msghdr's iovecs.
        let bufs = unsafe { iovecs(m.msg_iov, m.msg_iovlen as c_int)? };
        do_send(fd, bufs, flags)
    })
}

#[no_mangle]
pub extern "C" fn rwrite(fd: c_int, buf: *const c_void, len: usize) -> isize {
    size("rwrite", || do_send(fd, one(buf, len)?, 0))
}

#[no_mangle]
pub extern "C" fn rwritev(fd: c_int, iov: *const libc::iovec, n: c_int) -> isize {
    // SAFETY: the program's iovecs.
    size("rwritev", || do_send(fd, unsafe { iovecs(iov, n)? }, 0))
}

// ---- I/O maps ----

#[no_mangle]
pub extern "C" fn riomap(
    fd: c_int,
    buf: *mut c_void,
    len: usize,
    prot: c_int,
    _flags: c_int,
    offset: libc::off_t,
) -> libc::off_t {
    // `flags` is unused, as in rdma-core's.
    let r = size("riomap", || {
        let at = sock(fd)?.riomap(buf as u64, len, prot, offset)?;
        Ok(at as usize)
    });
    r as libc::off_t
}

#[no_mangle]
pub extern "C" fn riounmap(fd: c_int, buf: *mut c_void, len: usize) -> c_int {
    int("riounmap", || {
        sock(fd)?.riounmap(buf as u64, len)?;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn riowrite(
    fd: c_int,
    buf: *const c_void,
    count: usize,
    offset: libc::off_t,
    flags: c_int,
) -> usize {
    // size_t: -1 is all bits set, as rdma-core's.
    size("riowrite", || {
        if count == 0 {
            return Ok(0);
        }
        if buf.is_null() {
            return Err(Fail::new(libc::EFAULT, "buffer is NULL"));
        }
        let at = u64::try_from(offset)
            .map_err(|_| Fail::new(libc::EINVAL, "riowrite: a negative offset"))?;
        // SAFETY: the program passes `count` bytes at buf.
        let bytes = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), count) };
        sock(fd)?.riowrite(bytes, at, flags & libc::MSG_DONTWAIT != 0)
    }) as usize
}

// ---- readiness ----

fn timeout_of(ms: c_int) -> Option<Duration> {
    (ms >= 0).then(|| Duration::from_millis(ms as u64))
}

#[no_mangle]
pub extern "C" fn rpoll(fds: *mut libc::pollfd, nfds: libc::nfds_t, timeout: c_int) -> c_int {
    int("rpoll", || {
        if nfds > 65536 {
            return Err(Fail::new(libc::EINVAL, "too many descriptors"));
        }
        if nfds > 0 && fds.is_null() {
            return Err(Fail::new(libc::EFAULT, "fds is NULL"));
        }
        let list: &mut [libc::pollfd] = match nfds {
            0 => &mut [],
            // SAFETY: the program's array of nfds pollfds.
            n => unsafe { std::slice::from_raw_parts_mut(fds, n as usize) },
        };
        let mut work: Vec<(c_int, i16, i16)> = list.iter().map(|p| (p.fd, p.events, 0)).collect();
        let n = rsocket::rpoll(&mut work, timeout_of(timeout))?;
        for (p, w) in list.iter_mut().zip(&work) {
            p.revents = w.2;
        }
        Ok(n as c_int)
    })
}

#[no_mangle]
pub extern "C" fn rselect(
    nfds: c_int,
    readfds: *mut libc::fd_set,
    writefds: *mut libc::fd_set,
    exceptfds: *mut libc::fd_set,
    timeout: *mut libc::timeval,
) -> c_int {
    int("rselect", || {
        if !(0..=libc::FD_SETSIZE as c_int).contains(&nfds) {
            return Err(Fail::new(libc::EINVAL, "nfds beyond FD_SETSIZE"));
        }
        let isset = |set: *mut libc::fd_set, fd: c_int| -> bool {
            // SAFETY: the program's fd_set (not NULL), of FD_SETSIZE bits; fd < nfds.
            !set.is_null() && unsafe { libc::FD_ISSET(fd, set) }
        };
        let mut work: Vec<(c_int, i16, i16)> = Vec::new();
        for fd in 0..nfds {
            let mut events = 0i16;
            if isset(readfds, fd) {
                events |= libc::POLLIN;
            }
            if isset(writefds, fd) {
                events |= libc::POLLOUT;
            }
            if isset(exceptfds, fd) {
                events |= libc::POLLPRI;
            }
            if events != 0 {
                work.push((fd, events, 0));
            }
        }
        let wait = if timeout.is_null() {
            None
        } else {
            // SAFETY: the program's timeval.
            let tv = unsafe { *timeout };
            if tv.tv_sec < 0 || tv.tv_usec < 0 {
                return Err(Fail::new(libc::EINVAL, "negative timeout"));
            }
            Some(Duration::from_secs(tv.tv_sec as u64) + Duration::from_micros(tv.tv_usec as u64))
        };
        rsocket::rpoll(&mut work, wait)?;
        for set in [readfds, writefds, exceptfds] {
            if !set.is_null() {
                // SAFETY: the program's fd_set.
                unsafe { libc::FD_ZERO(set) };
            }
        }
        let mut count = 0;
        for (fd, events, revents) in work {
            let hit = |bit: i16| {
                events & bit != 0 && revents & (bit | libc::POLLERR | libc::POLLHUP) != 0
            };
            for (bit, set) in [
                (libc::POLLIN, readfds),
                (libc::POLLOUT, writefds),
                (libc::POLLPRI, exceptfds),
            ] {
                if hit(bit) && !set.is_null() {
                    // SAFETY: the program's fd_set; fd < nfds <= FD_SETSIZE.
                    unsafe { libc::FD_SET(fd, set) };
                    count += 1;
                }
            }
        }
        Ok(count)
    })
}

// ---- names, options, flags ----

#[no_mangle]
pub extern "C" fn rgetpeername(
    fd: c_int,
    addr: *mut libc::sockaddr,
    len: *mut libc::socklen_t,
) -> c_int {
    int("rgetpeername", || {
        let rs = sock(fd)?;
        if !rs.is_connected() {
            return Err(Fail::new(libc::ENOTCONN, "not connected"));
        }
        addr_out(rs.family, rs.names().1, addr, len)?;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn rgetsockname(
    fd: c_int,
    addr: *mut libc::sockaddr,
    len: *mut libc::socklen_t,
) -> c_int {
    int("rgetsockname", || {
        let rs = sock(fd)?;
        addr_out(rs.family, rs.names().0, addr, len)?;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn rsetsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    value: *const c_void,
    len: libc::socklen_t,
) -> c_int {
    int("rsetsockopt", || {
        let rs = sock(fd)?;
        let bytes: &[u8] = match (value.is_null(), len) {
            (_, 0) => &[],
            (true, _) => return Err(Fail::new(libc::EFAULT, "optval is NULL")),
            // SAFETY: the program passes len bytes at value.
            (false, n) => unsafe { std::slice::from_raw_parts(value.cast::<u8>(), n as usize) },
        };
        rs.set_option(level, name, bytes)?;
        Ok(0)
    })
}

#[no_mangle]
pub extern "C" fn rgetsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    value: *mut c_void,
    len: *mut libc::socklen_t,
) -> c_int {
    int("rgetsockopt", || {
        let rs = sock(fd)?;
        if value.is_null() || len.is_null() {
            return Err(Fail::new(libc::EFAULT, "optval or optlen is NULL"));
        }
        let v = rs.get_option(level, name)?;
        // SAFETY: the program's optlen.
        let room = unsafe { *len } as usize;
        let n = room.min(v.len());
        // SAFETY: the program passes *len writable bytes at value.
        unsafe {
            std::ptr::copy_nonoverlapping(v.as_ptr(), value.cast::<u8>(), n);
            *len = n as libc::socklen_t;
        }
        Ok(0)
    })
}

/// `int rfcntl(int socket, int cmd, ... /* arg */)`. A variadic C function; on x86-64 the
/// System V ABI passes its first variadic integer argument in the register of a third fixed
/// one, so it is read as a plain `long` (as every command rsockets serves takes an int).
#[no_mangle]
pub extern "C" fn rfcntl(fd: c_int, cmd: c_int, arg: c_long) -> c_int {
    int("rfcntl", || {
        let rs = sock(fd)?;
        match cmd {
            libc::F_GETFL => Ok(libc::O_RDWR
                | if rs.nonblocking() {
                    libc::O_NONBLOCK
                } else {
                    0
                }),
            libc::F_SETFL => {
                rs.set_nonblocking(arg as c_int & libc::O_NONBLOCK != 0);
                Ok(0)
            }
            libc::F_GETFD => Ok(libc::FD_CLOEXEC),
            libc::F_SETFD => Ok(0),
            _ => Err(Fail::new(
                libc::EINVAL,
                format!("fcntl command {cmd} not supported on rsockets"),
            )),
        }
    })
}
