//! The C library's own socket functions, found with `dlsym(RTLD_NEXT)`, and the raw calls the
//! shim makes on descriptors.
//!
//! This library exports its own `connect`, `listen`, `accept4`, `close`, `dup*`, `fcntl`,
//! `epoll_create*`, `epoll_ctl`, `poll`, `ppoll`, `select`,
//! `pselect`, `exec*` and `posix_spawn*` (see `abi`), so `libc::close` and the like, called
//! from inside it, would reach the shim's versions again: those are called here through the
//! pointers dlsym found. Waits through `freeflow-os` reach the shim's `poll`, which passes
//! every call without an accelerated listener on unchanged; the shim's own waits on a
//! listener call [`poll_fds`] here.

use freeflow_os::poll::{poll, PollFd};
use libc::{c_int, sockaddr, socklen_t};
use std::os::fd::BorrowedFd;
use std::sync::OnceLock;

type ConnectFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;
type ListenFn = unsafe extern "C" fn(c_int, c_int) -> c_int;
type Accept4Fn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t, c_int) -> c_int;
type NameFn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;
type CloseFn = unsafe extern "C" fn(c_int) -> c_int;
type DupFn = unsafe extern "C" fn(c_int) -> c_int;
type FcntlFn = unsafe extern "C" fn(c_int, c_int, ...) -> c_int;
type EpollCreate1Fn = unsafe extern "C" fn(c_int) -> c_int;
type EpollCtlFn = unsafe extern "C" fn(c_int, c_int, c_int, *mut libc::epoll_event) -> c_int;
type PollFn = unsafe extern "C" fn(*mut libc::pollfd, libc::nfds_t, c_int) -> c_int;
type PpollFn = unsafe extern "C" fn(
    *mut libc::pollfd,
    libc::nfds_t,
    *const libc::timespec,
    *const libc::sigset_t,
) -> c_int;
type SelectFn = unsafe extern "C" fn(
    c_int,
    *mut libc::fd_set,
    *mut libc::fd_set,
    *mut libc::fd_set,
    *mut libc::timeval,
) -> c_int;
type PselectFn = unsafe extern "C" fn(
    c_int,
    *mut libc::fd_set,
    *mut libc::fd_set,
    *mut libc::fd_set,
    *const libc::timespec,
    *const libc::sigset_t,
) -> c_int;
type ExecveFn = unsafe extern "C" fn(
    *const libc::c_char,
    *const *const libc::c_char,
    *const *const libc::c_char,
) -> c_int;

type PosixSpawnFn = unsafe extern "C" fn(
    *mut libc::pid_t,
    *const libc::c_char,
    *const libc::posix_spawn_file_actions_t,
    *const libc::posix_spawnattr_t,
    *const *mut libc::c_char,
    *const *mut libc::c_char,
) -> c_int;

struct Real {
    connect: ConnectFn,
    listen: ListenFn,
    accept4: Accept4Fn,
    getsockname: NameFn,
    getpeername: NameFn,
    close: CloseFn,
    dup: DupFn,
    fcntl: FcntlFn,
    epoll_create1: EpollCreate1Fn,
    epoll_ctl: EpollCtlFn,
    poll: PollFn,
    ppoll: PpollFn,
    select: SelectFn,
    pselect: PselectFn,
    execve: ExecveFn,
    execvpe: ExecveFn,
    posix_spawn: PosixSpawnFn,
    posix_spawnp: PosixSpawnFn,
}

fn lookup(name: &std::ffi::CStr) -> *mut libc::c_void {
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name only reads the loader's tables.
    let sym = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    assert!(!sym.is_null(), "libfsocket: the C library has no {name:?}");
    sym
}

fn real() -> &'static Real {
    static REAL: OnceLock<Real> = OnceLock::new();
    REAL.get_or_init(|| {
        // SAFETY: each symbol is the C library's function of exactly the signature named by
        // its type alias (POSIX prototypes), so the transmuted pointers are callable as such.
        unsafe {
            Real {
                connect: std::mem::transmute::<*mut libc::c_void, ConnectFn>(lookup(c"connect")),
                listen: std::mem::transmute::<*mut libc::c_void, ListenFn>(lookup(c"listen")),
                accept4: std::mem::transmute::<*mut libc::c_void, Accept4Fn>(lookup(c"accept4")),
                getsockname: std::mem::transmute::<*mut libc::c_void, NameFn>(lookup(
                    c"getsockname",
                )),
                getpeername: std::mem::transmute::<*mut libc::c_void, NameFn>(lookup(
                    c"getpeername",
                )),
                close: std::mem::transmute::<*mut libc::c_void, CloseFn>(lookup(c"close")),
                dup: std::mem::transmute::<*mut libc::c_void, DupFn>(lookup(c"dup")),
                fcntl: std::mem::transmute::<*mut libc::c_void, FcntlFn>(lookup(c"fcntl")),
                epoll_create1: std::mem::transmute::<*mut libc::c_void, EpollCreate1Fn>(lookup(
                    c"epoll_create1",
                )),
                epoll_ctl: std::mem::transmute::<*mut libc::c_void, EpollCtlFn>(lookup(
                    c"epoll_ctl",
                )),
                poll: std::mem::transmute::<*mut libc::c_void, PollFn>(lookup(c"poll")),
                ppoll: std::mem::transmute::<*mut libc::c_void, PpollFn>(lookup(c"ppoll")),
                select: std::mem::transmute::<*mut libc::c_void, SelectFn>(lookup(c"select")),
                pselect: std::mem::transmute::<*mut libc::c_void, PselectFn>(lookup(c"pselect")),
                execve: std::mem::transmute::<*mut libc::c_void, ExecveFn>(lookup(c"execve")),
                execvpe: std::mem::transmute::<*mut libc::c_void, ExecveFn>(lookup(c"execvpe")),
                posix_spawn: std::mem::transmute::<*mut libc::c_void, PosixSpawnFn>(lookup(
                    c"posix_spawn",
                )),
                posix_spawnp: std::mem::transmute::<*mut libc::c_void, PosixSpawnFn>(lookup(
                    c"posix_spawnp",
                )),
            }
        }
    })
}

/// # Safety
/// `addr` must point at `len` readable bytes (the application's own arguments, passed on).
pub unsafe fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    // SAFETY: forwarded unchanged; the caller's contract is connect(2)'s.
    unsafe { (real().connect)(fd, addr, len) }
}

pub fn listen(fd: c_int, backlog: c_int) -> c_int {
    // SAFETY: listen takes no pointers.
    unsafe { (real().listen)(fd, backlog) }
}

/// # Safety
/// `addr`/`len` must be NULL or valid as for accept4(2).
pub unsafe fn accept4(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int {
    // SAFETY: forwarded unchanged; the caller's contract is accept4(2)'s.
    unsafe { (real().accept4)(fd, addr, len, flags) }
}

/// # Safety
/// As for getsockname(2).
pub unsafe fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: forwarded unchanged.
    unsafe { (real().getsockname)(fd, addr, len) }
}

/// # Safety
/// As for getpeername(2).
pub unsafe fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: forwarded unchanged.
    unsafe { (real().getpeername)(fd, addr, len) }
}

/// Whether socket `fd` is listening.
pub fn is_listening(fd: c_int) -> bool {
    get_int_opt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN) == Some(1)
}

/// Stops listening socket `fd` listening (shutdown(SHUT_RD)): the clients in its accept queue
/// and those that come after get a reset; the socket stays bound, and may listen again.
pub fn stop_listening(fd: c_int) -> c_int {
    // SAFETY: shutdown takes no pointers (the shim does not interpose it).
    unsafe { libc::shutdown(fd, libc::SHUT_RD) }
}

pub fn close(fd: c_int) -> c_int {
    // SAFETY: close takes no pointers; closing an fd the shim owns or the app asked to close.
    unsafe { (real().close)(fd) }
}

/// The close_range system call over `first..=last`, skipping the numbers in `keep` (sorted):
/// one call per stretch between them. Made directly (this library exports close_range). On a
/// kernel without close_range (before 5.9) it fails with ENOSYS, as the C library's would.
pub fn close_range_around(first: c_int, last: c_int, flags: c_int, keep: &[c_int]) -> c_int {
    let mut from = first;
    for &kept in keep.iter().chain(std::iter::once(&c_int::MAX)) {
        let to = if kept == c_int::MAX { last } else { kept - 1 };
        if from <= to {
            let rc = close_range_syscall(from, to, flags);
            if rc != 0 {
                return rc;
            }
        }
        if kept == c_int::MAX || kept >= last {
            break;
        }
        from = kept + 1;
    }
    0
}

fn close_range_syscall(first: c_int, last: c_int, flags: c_int) -> c_int {
    // SAFETY: close_range takes two fd numbers and flags, no pointers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            last as libc::c_uint,
            flags as libc::c_uint,
        )
    };
    c_int::try_from(rc).unwrap_or(-1)
}

pub use freeflow_os::errno::{errno, set_errno};

/// An IPv4 endpoint read from a socket address: (ip, port, was it AF_INET6 v4-mapped).
pub type Endpoint = (std::net::Ipv4Addr, u16, bool);

/// Reads an AF_INET or v4-mapped AF_INET6 address.
///
/// # Safety
/// `addr` must be NULL or point at `len` readable bytes.
pub unsafe fn read_endpoint(addr: *const sockaddr, len: socklen_t) -> Option<Endpoint> {
    if addr.is_null() || (len as usize) < std::mem::size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: at least the family field is readable (checked above); read unaligned.
    let family = unsafe { std::ptr::read_unaligned(addr.cast::<libc::sa_family_t>()) } as c_int;
    match family {
        libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: len covers a whole sockaddr_in.
            let sin = unsafe { std::ptr::read_unaligned(addr.cast::<libc::sockaddr_in>()) };
            Some((
                std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
                false,
            ))
        }
        libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: len covers a whole sockaddr_in6.
            let sin6 = unsafe { std::ptr::read_unaligned(addr.cast::<libc::sockaddr_in6>()) };
            let ip6 = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let port = u16::from_be(sin6.sin6_port);
            if ip6.is_unspecified() {
                return Some((std::net::Ipv4Addr::UNSPECIFIED, port, true));
            }
            ip6.to_ipv4_mapped().map(|ip| (ip, port, true))
        }
        _ => None,
    }
}

/// The socket address of `ip:port`: AF_INET6 v4-mapped when `v6`, except the wildcard
/// address, which is `::` there (as the kernel names a dual-stack wildcard socket).
pub fn inet_sockaddr(
    ip: std::net::Ipv4Addr,
    port: u16,
    v6: bool,
) -> (libc::sockaddr_storage, socklen_t) {
    let (mut storage, len) = freeflow_proto::fdpass::inet_sockaddr(ip, port, v6);
    if v6 && ip.is_unspecified() {
        // SAFETY: inet_sockaddr wrote a sockaddr_in6 into the storage (v6), which is large
        // enough and aligned for it.
        let sin6 = unsafe {
            &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
        };
        sin6.sin6_addr.s6_addr = [0; 16];
    }
    (storage, len)
}

/// Writes `ip:port` (as AF_INET6 v4-mapped when `v6`; the wildcard as `::`) the way
/// getsockname(2) does: at most `*len` bytes, and `*len` set to the full size.
///
/// # Safety
/// `addr` must point at `*len` writable bytes and `len` at a writable socklen_t, or either NULL.
pub unsafe fn write_endpoint(
    addr: *mut sockaddr,
    len: *mut socklen_t,
    ip: std::net::Ipv4Addr,
    port: u16,
    v6: bool,
) -> bool {
    if addr.is_null() || len.is_null() {
        return false;
    }
    // SAFETY: len is non-null and writable per the contract.
    let room = unsafe { *len } as usize;
    let (storage, full) = inet_sockaddr(ip, port, v6);
    let full = full as usize;
    // SAFETY: addr has `room` writable bytes; we copy at most that many; len is writable.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&storage as *const libc::sockaddr_storage).cast::<u8>(),
            addr.cast::<u8>(),
            full.min(room),
        );
        *len = full as socklen_t;
    }
    true
}

/// An integer socket option of `fd`.
pub fn get_int_opt(fd: c_int, level: c_int, name: c_int) -> Option<c_int> {
    let mut value: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into value.
    let rc =
        unsafe { libc::getsockopt(fd, level, name, (&mut value as *mut c_int).cast(), &mut len) };
    (rc == 0).then_some(value)
}

/// The receive timeout of socket `fd` (SO_RCVTIMEO), which bounds a blocking accept too;
/// None when it has none (or it cannot be read).
pub fn receive_timeout(fd: c_int) -> Option<std::time::Duration> {
    let mut value = libc::timeval {
        tv_sec: 0,
        tv_usec: 0,
    };
    let mut len = std::mem::size_of::<libc::timeval>() as socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into value.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&mut value as *mut libc::timeval).cast(),
            &mut len,
        )
    };
    let secs = u64::try_from(value.tv_sec).ok()?;
    let micros = u64::try_from(value.tv_usec).ok()?;
    let timeout = std::time::Duration::from_secs(secs) + std::time::Duration::from_micros(micros);
    (rc == 0 && !timeout.is_zero()).then_some(timeout)
}

pub fn set_int_opt(fd: c_int, level: c_int, name: c_int, value: c_int) {
    // SAFETY: passes a live c_int of the declared size.
    unsafe { libc::setsockopt(fd, level, name, (&value as *const c_int).cast(), 4) };
}

// The C library's fcntl, dup and epoll_create1 through dlsym: this library exports its own
// (`libc::fcntl` would bind to them).
pub fn fcntl_get(fd: c_int, cmd: c_int) -> c_int {
    // SAFETY: F_GETFL / F_GETFD take no pointer argument.
    unsafe { (real().fcntl)(fd, cmd) }
}

pub fn fcntl_set(fd: c_int, cmd: c_int, value: c_int) -> c_int {
    // SAFETY: F_SETFL, F_SETFD and F_DUPFD(_CLOEXEC) take an int argument.
    unsafe { (real().fcntl)(fd, cmd, value) }
}

/// The C library's fcntl with the application's third argument, passed on as the machine word
/// it arrived in (an int or a pointer).
///
/// # Safety
/// `arg` must be what fcntl(2) expects for `cmd`.
pub unsafe fn fcntl(fd: c_int, cmd: c_int, arg: libc::c_ulong) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { (real().fcntl)(fd, cmd, arg) }
}

/// The C library's epoll_ctl.
///
/// # Safety
/// `event` must be NULL (EPOLL_CTL_DEL) or point at a live epoll_event.
pub unsafe fn epoll_ctl(epfd: c_int, op: c_int, fd: c_int, event: *mut libc::epoll_event) -> c_int {
    // SAFETY: the caller's contract is epoll_ctl(2)'s.
    unsafe { (real().epoll_ctl)(epfd, op, fd, event) }
}

/// The C library's poll.
///
/// # Safety
/// `fds` must point at `nfds` writable pollfd entries.
pub unsafe fn poll_raw(fds: *mut libc::pollfd, nfds: libc::nfds_t, ms: c_int) -> c_int {
    // SAFETY: the caller's contract is poll(2)'s.
    unsafe { (real().poll)(fds, nfds, ms) }
}

/// The C library's ppoll.
///
/// # Safety
/// As ppoll(2).
pub unsafe fn ppoll(
    fds: *mut libc::pollfd,
    nfds: libc::nfds_t,
    timeout: *const libc::timespec,
    sigmask: *const libc::sigset_t,
) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { (real().ppoll)(fds, nfds, timeout, sigmask) }
}

/// The C library's select.
///
/// # Safety
/// As select(2): each set NULL or a live fd_set, `timeout` NULL or live.
pub unsafe fn select(
    nfds: c_int,
    read: *mut libc::fd_set,
    write: *mut libc::fd_set,
    except: *mut libc::fd_set,
    timeout: *mut libc::timeval,
) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { (real().select)(nfds, read, write, except, timeout) }
}

/// The C library's pselect.
///
/// # Safety
/// As pselect(2).
pub unsafe fn pselect(
    nfds: c_int,
    read: *mut libc::fd_set,
    write: *mut libc::fd_set,
    except: *mut libc::fd_set,
    timeout: *const libc::timespec,
    sigmask: *const libc::sigset_t,
) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { (real().pselect)(nfds, read, write, except, timeout, sigmask) }
}

/// Waits (the C library's poll, not the shim's) until one of `fds` has an event or `timeout`
/// passes (None: no limit). Ok(number of entries with events), or the error.
pub fn poll_fds(
    fds: &mut [libc::pollfd],
    timeout: Option<std::time::Duration>,
) -> std::io::Result<usize> {
    let ms = timeout.map_or(-1, |t| {
        // Rounded up: a wait never ends before its timeout.
        c_int::try_from(t.as_nanos().div_ceil(1_000_000)).unwrap_or(c_int::MAX)
    });
    // SAFETY: a live slice of pollfd entries, its length passed with it.
    let rc = unsafe { poll_raw(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc as usize)
}

pub fn dup(fd: c_int) -> c_int {
    // SAFETY: dup takes an fd number and touches no memory.
    unsafe { (real().dup)(fd) }
}

/// The C library's execve.
///
/// # Safety
/// execve(2)'s contract: NUL-terminated strings and NULL-terminated arrays.
pub unsafe fn execve(
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { (real().execve)(path, argv, envp) }
}

/// The C library's execvpe (searches PATH like execvp).
///
/// # Safety
/// As [`execve`].
pub unsafe fn execvpe(
    file: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { (real().execvpe)(file, argv, envp) }
}

/// The C library's posix_spawn (`search`: posix_spawnp, which searches PATH).
///
/// # Safety
/// posix_spawn(3)'s contract: valid pointers (or NULL where allowed), NUL-terminated strings
/// and NULL-terminated arrays.
pub unsafe fn posix_spawn(
    search: bool,
    pid: *mut libc::pid_t,
    path: *const libc::c_char,
    file_actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut libc::c_char,
    envp: *const *mut libc::c_char,
) -> c_int {
    let f = if search {
        real().posix_spawnp
    } else {
        real().posix_spawn
    };
    // SAFETY: the caller's contract.
    unsafe { f(pid, path, file_actions, attr, argv, envp) }
}

pub fn epoll_create1(flags: c_int) -> c_int {
    // SAFETY: epoll_create1 takes flags and touches no memory.
    unsafe { (real().epoll_create1)(flags) }
}

/// dup3 by system call: `libc::dup3` would bind to this library's own exported `dup3`.
pub fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    // SAFETY: plain syscall on integers.
    unsafe { libc::syscall(libc::SYS_dup3, old, new, flags) as c_int }
}

/// Waits until `fd` is writable (a connect finished). Returns false on EINTR.
pub fn wait_writable(fd: c_int) -> bool {
    // SAFETY: `fd` is the application's socket, in the middle of its own connect call, so open
    // for the wait; a descriptor closed meanwhile by another thread only makes poll report
    // POLLNVAL.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    poll(&mut [PollFd::new(fd, libc::POLLOUT)], None).is_ok()
}

pub fn getpid() -> i32 {
    // SAFETY: no arguments, no failure.
    unsafe { libc::getpid() }
}

/// The inode of socket `fd` (None if it is not an open socket): what tells one socket from
/// another that later got the same fd number.
pub fn socket_inode(fd: c_int) -> Option<u64> {
    // SAFETY: stat is plain data; zero is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one struct stat into a live local.
    let ok = unsafe { libc::fstat(fd, &mut st) } == 0;
    (ok && st.st_mode & libc::S_IFMT == libc::S_IFSOCK).then_some(st.st_ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `fd` is open in this process.
    fn is_open(fd: c_int) -> bool {
        fcntl_get(fd, libc::F_GETFD) >= 0
    }

    #[test]
    fn close_range_around_closes_each_stretch_and_keeps_the_kept() {
        // Six descriptors at consecutive high numbers nothing else in the test uses.
        let base = fcntl_set(0, libc::F_DUPFD_CLOEXEC, 900);
        assert!(base >= 900);
        let fds: Vec<c_int> = std::iter::once(base)
            .chain((1..6).map(|i| fcntl_set(0, libc::F_DUPFD_CLOEXEC, base + i)))
            .collect();
        assert_eq!(fds, (base..base + 6).collect::<Vec<_>>());
        let keep = [base + 1, base + 4];
        assert_eq!(close_range_around(base, base + 5, 0, &keep), 0);
        let open: Vec<c_int> = fds.iter().copied().filter(|&fd| is_open(fd)).collect();
        assert_eq!(open, keep);
        // Kept ones at the ends of the range, and a range that is only kept ones.
        assert_eq!(close_range_around(base + 1, base + 1, 0, &[base + 1]), 0);
        assert!(is_open(base + 1));
        assert_eq!(close_range_around(base + 1, base + 4, 0, &keep), 0);
        assert!(is_open(base + 1) && is_open(base + 4));
        assert_eq!(close_range_around(base, base + 5, 0, &[]), 0);
        assert!(!is_open(base + 1) && !is_open(base + 4));
    }
}
