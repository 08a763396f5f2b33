//! The router's socket calls that std does not cover (non-blocking sockets it hands between
//! processes, addresses, options, accept queues, an edge-triggered arrival watch), the
//! descriptors it must close elsewhere, its lock file and its ready pipe. The calls the router
//! shares with the other Freeflow processes (signals, poll, memory files) are `freeflow-os`'s,
//! called directly.

use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// Takes an exclusive, non-blocking flock on `path` (created 0600) and holds it as long as the
/// returned file lives: one router per runtime directory.
pub fn lock_exclusive(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        // The error flock(2) reports, as the router's log has always said it.
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(io::Error::from_raw_os_error(libc::EWOULDBLOCK))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Writes the ready line to the pipe `fd` that the router's supervisor handed it
/// (`--ready-fd`), then closes it.
pub fn write_ready_line(fd: RawFd) {
    // SAFETY: the parent handed us this fd for exactly this purpose; the caller passes it once,
    // so we own it from here and close it when done.
    let mut ready = unsafe { std::fs::File::from_raw_fd(fd) };
    let _ = ready.write_all(b"ready\n");
}

/// Non-blocking receive into `buf`: `Ok(Some(n))` with n bytes (0 = orderly close), `Ok(None)`
/// if nothing is waiting.
pub fn recv_nonblocking(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: recv writes at most buf.len() bytes into buf.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let err = io::Error::last_os_error();
    if err.kind() == io::ErrorKind::WouldBlock {
        Ok(None)
    } else {
        Err(err)
    }
}

/// A new TCP socket in the router's (host) network namespace: non-blocking, close-on-exec.
pub fn tcp_socket(v6: bool) -> io::Result<OwnedFd> {
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain syscall; the result is checked.
    let raw = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Binds `fd` to `ip:port` (port 0: the kernel picks).
pub fn bind(fd: &OwnedFd, ip: std::net::Ipv4Addr, port: u16, v6: bool) -> io::Result<()> {
    let (addr, len) = freeflow_proto::fdpass::inet_sockaddr(ip, port, v6);
    // SAFETY: addr holds a valid socket address of `len` bytes.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_storage).cast(),
            len,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Starts connecting `fd` to `ip:port` without waiting. Ok(true) if already connected,
/// Ok(false) if in progress.
pub fn connect_nonblocking(
    fd: &OwnedFd,
    ip: std::net::Ipv4Addr,
    port: u16,
    v6: bool,
) -> io::Result<bool> {
    let (addr, len) = freeflow_proto::fdpass::inet_sockaddr(ip, port, v6);
    // SAFETY: addr holds a valid socket address of `len` bytes.
    if unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_storage).cast(),
            len,
        )
    } == 0
    {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EINPROGRESS) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Listens on `fd` with `backlog`.
pub fn listen(fd: &OwnedFd, backlog: i32) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we own.
    if unsafe { libc::listen(fd.as_raw_fd(), backlog) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The local port `fd` is bound to.
pub fn local_port(fd: &OwnedFd) -> io::Result<u16> {
    // SAFETY: sockaddr_storage is plain data; zero is valid.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into addr.
    if unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // Both sockaddr_in and sockaddr_in6 keep the port right after the family.
    // SAFETY: the kernel filled an AF_INET or AF_INET6 address; the port field sits at the same
    // offset in both, inside the storage.
    let port =
        unsafe { (*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>()).sin_port };
    Ok(u16::from_be(port))
}

/// Sets SO_REUSEADDR.
pub fn set_reuseaddr(fd: &OwnedFd) -> io::Result<()> {
    set_flag(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR)
}

/// Sets SO_LINGER to "on, 0 s": the socket's close then resets the connection instead of
/// leaving it in TIME_WAIT (the relay's doorbells would otherwise hold a port each for 60 s).
pub fn set_linger_zero(fd: &OwnedFd) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: passes a live linger of the declared size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets an integer socket option to 1.
fn set_flag(fd: &OwnedFd, level: libc::c_int, name: libc::c_int) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: passes a live c_int of the declared size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An integer socket option.
pub fn int_opt(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into value.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Sets O_NONBLOCK on `fd`'s open file description.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on an fd we hold; no memory is passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes sent on a Unix socket that its peer has not read yet (SIOCOUTQ): with
/// [`send_capacity`], how close a peer that does not read is to blocking us.
pub fn unsent_bytes(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one c_int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(queued.max(0) as usize)
}

/// The send buffer size of socket `fd` (SO_SNDBUF).
pub fn send_capacity(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let capacity = int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF)?;
    Ok(capacity.max(0) as usize)
}

/// The IPv4 address and port `fd` is bound to (v4-mapped IPv6 included).
pub fn local_addr(fd: BorrowedFd<'_>) -> io::Result<(Ipv4Addr, u16)> {
    // SAFETY: sockaddr_storage is plain data; zero is valid.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into addr.
    let rc = unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let found = ipv4_of(&addr);
    found.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an IPv4 address"))
}

/// The IPv4 address and port in a socket address the kernel wrote (v4-mapped IPv6 included).
fn ipv4_of(addr: &libc::sockaddr_storage) -> Option<(Ipv4Addr, u16)> {
    match i32::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some((
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr)
                .to_ipv4_mapped()
                .map(|ip| (ip, u16::from_be(sin6.sin6_port)))
        }
        _ => None,
    }
}

/// A descriptor that came from a container (or that a container also holds). Closing one can
/// block: a socket the container gave SO_LINGER with unsent data, a file on a FUSE mount. So it
/// is closed on a separate thread, never on the control thread.
#[derive(Debug)]
pub struct Untrusted(Option<OwnedFd>);

impl Untrusted {
    pub fn new(fd: OwnedFd) -> Untrusted {
        Untrusted(Some(fd))
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.0.as_ref().expect("present until drop").as_fd()
    }

    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.as_fd().as_raw_fd()
    }

    /// Closes it here if it is a listening TCP socket (closing one cannot block: it has no data
    /// to send), elsewhere otherwise.
    pub fn close_if_listening(mut self) {
        let listening =
            int_opt(self.as_fd(), libc::SOL_SOCKET, libc::SO_ACCEPTCONN).is_ok_and(|v| v == 1);
        if listening {
            drop(self.0.take());
        }
    }

    /// A duplicate (same open file description).
    pub fn try_clone(&self) -> io::Result<OwnedFd> {
        self.as_fd().try_clone_to_owned()
    }

    /// The descriptor, to keep: for one checked to be of a kind whose close cannot block (a
    /// memfd).
    pub fn into_inner(mut self) -> OwnedFd {
        self.0.take().expect("present until drop")
    }
}

impl From<OwnedFd> for Untrusted {
    fn from(fd: OwnedFd) -> Untrusted {
        Untrusted::new(fd)
    }
}

impl Drop for Untrusted {
    fn drop(&mut self) {
        if let Some(fd) = self.0.take() {
            close_elsewhere(fd);
        }
    }
}

fn close_elsewhere(fd: OwnedFd) {
    use std::sync::mpsc::{channel, Sender};
    use std::sync::{Mutex, OnceLock};
    static CLOSER: OnceLock<Mutex<Sender<OwnedFd>>> = OnceLock::new();
    let sender = CLOSER.get_or_init(|| {
        let (tx, rx) = channel::<OwnedFd>();
        let spawned = std::thread::Builder::new()
            .name("ff-closer".into())
            .spawn(move || {
                // Started by the control thread, whose priority it would inherit: closing a
                // container's descriptors is no reason to take CPU from applications.
                let _ = set_thread_nice(0);
                rx.into_iter().for_each(drop)
            });
        if let Err(e) = spawned {
            log::warn!("cannot start the closer thread: {e}");
        }
        Mutex::new(tx)
    });
    let sender = sender.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(returned) = sender.send(fd) {
        // No closer thread: leaking the fd is better than blocking the control thread.
        std::mem::forget(returned.0);
    }
}

/// Whether socket `fd` belongs to the network namespace this process runs in. A container can
/// make sockets only in its own namespace, so a socket in ours came from a router.
pub fn in_our_netns(fd: BorrowedFd<'_>) -> io::Result<bool> {
    const SIOCGSKNS: libc::c_ulong = 0x894C;
    // SAFETY: SIOCGSKNS takes no argument and returns a new fd for the socket's namespace.
    let ns = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCGSKNS as _) };
    if ns < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ns is a fresh fd nobody else owns.
    let ns = unsafe { OwnedFd::from_raw_fd(ns) };
    let theirs = std::fs::File::from(ns).metadata()?;
    let ours = std::fs::metadata("/proc/thread-self/ns/net")?;
    use std::os::unix::fs::MetadataExt;
    Ok(theirs.ino() == ours.ino() && theirs.dev() == ours.dev())
}

/// Raises this process's open-file limit to its hard limit (the router holds sockets for every
/// accelerated listener and waiting client).
pub fn raise_fd_limit() {
    // SAFETY: rlimit is plain data; zero is valid.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit writes one rlimit into a live local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0
        && limit.rlim_cur < limit.rlim_max
    {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads one rlimit from a live local.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    }
}

/// Lets the calling thread run on every core this process may use (a thread started by a
/// pinned thread inherits its one core). The kernel keeps the mask within the process's
/// cpuset, so asking for all cores is asking for all allowed ones.
#[cfg(any(feature = "rdma-hw", test))]
pub fn unpin_current_thread() -> io::Result<()> {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut all: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in 0..libc::CPU_SETSIZE as usize {
        // SAFETY: `cpu` is below CPU_SETSIZE, within the set's bits.
        unsafe { libc::CPU_SET(cpu, &mut all) };
    }
    // SAFETY: pid 0 names the calling thread; the set is a live local of the size given.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &all) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the calling thread's nice value (on Linux a per-thread attribute, inherited by the
/// threads it starts afterwards). Lowering it takes CAP_SYS_NICE.
pub fn set_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority takes plain integers; PRIO_PROCESS with a thread id names that thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Where the kernel groups processes by session for CPU time (CONFIG_SCHED_AUTOGROUP, on unless
/// `sched_autogroup_enabled` is 0, and only outside a cgroup of the cpu controller), a thread's
/// nice value weighs only against the threads of its own session: the session as a whole gets
/// one share among the others. This sets the nice value of this process's session group, if
/// this process leads its session (it never changes the group of a shell that started it).
/// `Ok(false)`: nothing to set (no autogroups, or not the session's leader).
pub fn set_session_nice(nice: i32) -> io::Result<bool> {
    match std::fs::read_to_string("/proc/sys/kernel/sched_autogroup_enabled") {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    // SAFETY: getsid and getpid take plain integers and cannot fault.
    let leader = unsafe { libc::getsid(0) == libc::getpid() };
    if !leader {
        return Ok(false);
    }
    std::fs::write("/proc/self/autogroup", format!("{nice}\n"))?;
    Ok(true)
}

/// The calling thread's nice value.
pub fn thread_nice() -> io::Result<i32> {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    // getpriority may return -1 as a value: only errno tells a failure.
    // SAFETY: __errno_location returns this thread's errno.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: getpriority takes plain integers.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    let err = io::Error::last_os_error();
    match (nice, err.raw_os_error()) {
        (-1, Some(e)) if e != 0 => Err(err),
        _ => Ok(nice),
    }
}

/// The inode of the file `fd` refers to (sockets: one per socket).
pub fn inode(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: stat is plain data; zero is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one stat into a live local.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_ino)
}

/// Listening sockets watched for arrivals, edge-triggered (an epoll instance, itself polled):
/// one event when new connections are queued, none for those already waiting.
pub struct ArrivalWatch {
    epoll: OwnedFd,
}

impl ArrivalWatch {
    pub fn new() -> io::Result<ArrivalWatch> {
        // SAFETY: plain system call; the result is checked.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(ArrivalWatch { epoll })
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.epoll.as_fd()
    }

    fn ctl(&self, op: libc::c_int, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: token,
        };
        // SAFETY: epoll_ctl reads one live epoll_event.
        let rc = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd.as_raw_fd(), &mut event) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn add(&self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token)
    }

    pub fn remove(&self, fd: BorrowedFd<'_>) {
        let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0);
    }

    /// The tokens of the sockets that had arrivals since the last call.
    pub fn drain(&self) -> Vec<u64> {
        const BATCH: usize = 64;
        let mut tokens = Vec::new();
        loop {
            // SAFETY: epoll_event is plain data; zero is valid.
            let mut events: [libc::epoll_event; BATCH] = unsafe { std::mem::zeroed() };
            // SAFETY: epoll_wait writes at most BATCH events into the live array.
            let n = unsafe {
                libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), BATCH as i32, 0)
            };
            if n <= 0 {
                return tokens;
            }
            tokens.extend(events[..n as usize].iter().map(|e| e.u64));
            if (n as usize) < BATCH {
                return tokens;
            }
        }
    }
}

/// How many clients wait in listening socket `fd`'s accept queue, read without accepting
/// (TCP_INFO: for a listener, the kernel puts its accept queue's length in `tcpi_unacked`).
/// `None` if the socket is not listening (any more).
pub fn accept_queue(fd: BorrowedFd<'_>) -> io::Result<Option<u32>> {
    const TCP_LISTEN: u8 = 10;
    // SAFETY: tcp_info is plain data; zero is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into info.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((info.tcpi_state == TCP_LISTEN).then_some(info.tcpi_unacked))
}

/// How many times the calling thread was switched out while it could still run (preempted, or
/// a `sched_yield` that let another task run): when this grows, another task wants its core.
pub fn involuntary_switches() -> io::Result<u64> {
    // SAFETY: rusage is plain data; getrusage fills the one we pass and keeps no pointer to it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_THREAD with a live, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(usage.ru_nivcsw).unwrap_or(0))
}

/// The kernel's `struct sched_attr` as of SCHED_ATTR_SIZE_VER1 (include/uapi/linux/sched/types.h).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    /// For SCHED_OTHER (Linux 6.12 and later): the task's time slice in ns (0: the default).
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

/// The calling thread's scheduling attributes.
fn thread_sched_attr() -> io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    // SAFETY: sched_getattr writes at most `size` bytes (our struct's size) into a live local;
    // pid 0 is the calling thread.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut SchedAttr,
            std::mem::size_of::<SchedAttr>() as libc::c_uint,
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attr)
}

/// Asks for a time slice of `slice` for the calling thread, keeping its policy (which must be
/// SCHED_OTHER) and nice value; returns the slice the kernel reports afterwards (the kernel
/// keeps it within 0.1 ms..100 ms; kernels before 6.12 ignore the request and report 0).
///
/// Under EEVDF a task's virtual deadline is its slice ahead of it, and a task woken with an
/// earlier deadline than the running one's preempts it: a thread with a short slice gets the
/// core as soon as it wakes, instead of at the end of the slice of whatever runs there. Its
/// share of the CPU is the same (that is its weight's).
pub fn set_thread_slice(slice: std::time::Duration) -> io::Result<std::time::Duration> {
    let mut attr = thread_sched_attr()?;
    if attr.sched_policy != libc::SCHED_OTHER as u32 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "the thread's policy is {}, not SCHED_OTHER",
                attr.sched_policy
            ),
        ));
    }
    attr.size = std::mem::size_of::<SchedAttr>() as u32;
    attr.sched_flags = 0;
    attr.sched_runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    // SAFETY: sched_setattr reads one live, fully initialised SchedAttr whose size field is
    // its own size; pid 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(std::time::Duration::from_nanos(
        thread_sched_attr()?.sched_runtime,
    ))
}

#[cfg(test)]
mod tests {
    use super::{set_thread_nice, set_thread_slice, thread_nice, unpin_current_thread};

    /// The nice value is the thread's own (the control thread's must not reach the shards
    /// started before it), and threads started afterwards inherit it.
    #[test]
    fn nice_is_per_thread_and_inherited_by_threads_started_after() {
        let before = thread_nice().unwrap();
        let (own, child) = std::thread::spawn(move || {
            // Raising one's own nice value needs no privilege.
            set_thread_nice(before + 3).unwrap();
            let child = std::thread::spawn(|| thread_nice().unwrap())
                .join()
                .unwrap();
            (thread_nice().unwrap(), child)
        })
        .join()
        .unwrap();
        assert_eq!((own, child), (before + 3, before + 3));
        assert_eq!(thread_nice().unwrap(), before);
    }

    /// A thread started by a thread pinned to one core gets that core alone until it unpins
    /// itself; then it has every core the process had.
    #[test]
    fn an_unpinned_thread_has_the_process_cores_back() {
        let cores = |ids: Option<Vec<core_affinity::CoreId>>| -> Vec<usize> {
            ids.unwrap_or_default().iter().map(|c| c.id).collect()
        };
        let all = cores(core_affinity::get_core_ids());
        let first = core_affinity::CoreId { id: all[0] };
        let (inherited, unpinned) = std::thread::spawn(move || {
            assert!(core_affinity::set_for_current(first));
            std::thread::spawn(move || {
                let inherited = cores(core_affinity::get_core_ids());
                unpin_current_thread().unwrap();
                (inherited, cores(core_affinity::get_core_ids()))
            })
            .join()
            .unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(inherited, vec![first.id]);
        assert_eq!(unpinned, all);
    }

    /// A shard's slice request keeps its nice value, and the kernel reports the slice (kernels
    /// from 6.12 on; older ones accept the call and ignore the slice).
    #[test]
    fn a_thread_slice_is_applied_and_keeps_the_nice_value() {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut numbers = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse::<u32>().unwrap_or(0));
        let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        let wanted = std::time::Duration::from_micros(100);
        let before = thread_nice().unwrap();
        let (applied, nice) = std::thread::spawn(move || {
            set_thread_nice(before + 2).unwrap();
            let applied = set_thread_slice(wanted).unwrap();
            (applied, thread_nice().unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(nice, before + 2);
        if version >= (6, 12) {
            assert_eq!(applied, wanted, "kernel {}", release.trim());
        } else {
            assert_eq!(
                applied,
                std::time::Duration::ZERO,
                "kernel {}",
                release.trim()
            );
        }
    }
}
