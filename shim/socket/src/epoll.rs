//! Epoll registrations made on a socket before the shim swaps it for a host socket.
//!
//! The swap (dup3 of the host socket onto the application's fd) closes the original socket, and
//! the kernel drops every epoll registration of a closed file; the application would never hear
//! from its fd again. So before a swap the shim reads which of the process's epoll instances
//! watch the fd (the kernel lists them in /proc/self/fdinfo/<epfd>), and after it adds the same
//! events and data for the new socket. The shim knows the process's epoll instances by
//! wrapping epoll_create/epoll_create1.
//!
//! Also, the overlay listener beside the host listener (see `overlay_accept`): an epoll
//! instance that watches an accelerated listener watches the shim's duplicate of its overlay
//! listener too, with the application's events and data (a "mirror"), so that a client without
//! Freeflow wakes the application's event loop as an accelerated client does; the loop then
//! calls accept on the listener's fd, where the shim's non-blocking accept looks at the overlay
//! listener when the host listener has nothing. The mirror follows the application's
//! epoll_ctl (ADD, MOD, DEL), and is withdrawn when the listener or the epoll instance is
//! closed, or the overlay listener stops listening (no router: a level-triggered instance would
//! report its hang-up again and again), and registered again when it listens again.
//! EPOLLEXCLUSIVE is passed on (forked workers each register it in their own instance, and
//! the kernel wakes one of them per client). An EPOLLONESHOT registration is not mirrored: the
//! two would have to disarm each other at the wait, and an event names its registration only
//! by the application's data, which other fds may share (one handler for all, or data 0), so
//! another fd's event would disarm the listener for good. Such a listener's plain clients come
//! by the router's doorbell, as before the mirrors.

use crate::forklock::ForkLock;
use crate::real;
use libc::c_int;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};

pub(crate) static EPOLL_FDS: ForkLock<Vec<c_int>> = ForkLock::new(Vec::new());
/// Set once an epoll instance exists, so that close() elsewhere costs one relaxed load.
static ANY: AtomicBool = AtomicBool::new(false);

pub fn created(epfd: c_int) {
    if epfd < 0 {
        return;
    }
    ANY.store(true, Ordering::Relaxed);
    let mut fds = EPOLL_FDS.lock();
    if !fds.contains(&epfd) {
        fds.push(epfd);
    }
}

/// `fd` was closed (or replaced by dup2/dup3): it is no longer one of our epoll instances.
pub fn closed(fd: c_int) {
    if !ANY.load(Ordering::Relaxed) {
        return;
    }
    EPOLL_FDS.lock().retain(|&e| e != fd);
}

/// Every fd from `first` to `last` was closed (close_range).
pub fn closed_range(first: c_int, last: c_int) {
    if !ANY.load(Ordering::Relaxed) {
        return;
    }
    EPOLL_FDS.lock().retain(|&e| e < first || e > last);
}

/// One epoll instance's interest in an fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registration {
    pub epfd: c_int,
    pub events: u32,
    pub data: u64,
}

/// The registrations of `fd` (the file it refers to now) in the process's epoll instances.
pub fn registrations_of(fd: c_int) -> Vec<Registration> {
    if !ANY.load(Ordering::Relaxed) {
        return Vec::new();
    }
    let Some(inode) = real::socket_inode(fd) else {
        return Vec::new();
    };
    let epfds = EPOLL_FDS.lock().clone();
    let mut found = Vec::new();
    for epfd in epfds {
        let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{epfd}")) else {
            continue;
        };
        found.extend(
            parse_fdinfo(&info)
                .into_iter()
                .filter(|e| e.fd == fd && e.inode == inode)
                .map(|e| Registration {
                    epfd,
                    events: e.events,
                    data: e.data,
                }),
        );
    }
    found
}

/// Removes the registrations of `fd` (the original socket) before the swap. The kernel would
/// drop them itself only when the original file is closed everywhere, and the router keeps a
/// copy of a listener's: the application would get events from a socket it no longer has.
pub fn forget(fd: c_int, registrations: &[Registration]) {
    for r in registrations {
        let mut unused = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: EPOLL_CTL_DEL ignores the event; a live one is passed for old kernels.
        unsafe { real::epoll_ctl(r.epfd, libc::EPOLL_CTL_DEL, fd, &mut unused) };
    }
}

/// Registers `fd` (now the host socket) as it was registered before the swap.
pub fn restore(fd: c_int, registrations: &[Registration]) {
    for r in registrations {
        let mut event = libc::epoll_event {
            events: r.events,
            u64: r.data,
        };
        // SAFETY: epoll_ctl reads one epoll_event from a live local.
        let rc = unsafe { real::epoll_ctl(r.epfd, libc::EPOLL_CTL_ADD, fd, &mut event) };
        if rc != 0 && real::errno() == libc::EEXIST {
            // SAFETY: as above.
            unsafe { real::epoll_ctl(r.epfd, libc::EPOLL_CTL_MOD, fd, &mut event) };
        }
    }
}

/// The shim's overlay listener registered in an epoll instance beside an accelerated listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mirror {
    epfd: c_int,
    /// The application's fd of the (host) listener it stands beside.
    listener: c_int,
    /// The shim's duplicate of the overlay listener.
    overlay: c_int,
    /// The process that registered it: an instance shared with a forked child is left alone
    /// when the child closes its copies (the kernel keeps registrations while a process holds
    /// the files).
    pid: i32,
    events: u32,
    data: u64,
    /// Registered now; false while withdrawn (its overlay listener is not listening).
    armed: bool,
}

pub(crate) static MIRRORS: ForkLock<Vec<Mirror>> = ForkLock::new(Vec::new());
/// Set once a mirror exists, so that close() elsewhere costs one relaxed load.
static ANY_MIRROR: AtomicBool = AtomicBool::new(false);

const ONESHOT: u32 = libc::EPOLLONESHOT as u32;

fn ctl(epfd: c_int, op: c_int, fd: c_int, events: u32, data: u64) -> Result<(), c_int> {
    let mut event = libc::epoll_event { events, u64: data };
    // SAFETY: epoll_ctl reads one epoll_event from a live local (ignored by DEL).
    let rc = unsafe { real::epoll_ctl(epfd, op, fd, &mut event) };
    if rc == 0 {
        Ok(())
    } else {
        Err(real::errno())
    }
}

/// The application's epoll_ctl(`epfd`, `op`, `fd`) with `event` (events and data; None for
/// DEL) succeeded: if `fd` is an accelerated listener, its overlay listener follows. Returns
/// the overlay address of a listener the instance now watches (its process takes that
/// listener's clients without Freeflow itself, and tells the router so).
pub fn after_ctl(
    epfd: c_int,
    op: c_int,
    fd: c_int,
    event: Option<(u32, u64)>,
) -> Option<(Ipv4Addr, u16)> {
    match (op, event) {
        (libc::EPOLL_CTL_DEL, _) => {
            if !ANY_MIRROR.load(Ordering::Relaxed) {
                return None;
            }
            let gone = take_mirrors(|m| m.epfd == epfd && m.listener == fd);
            for m in gone.iter().filter(|m| m.armed) {
                let _ = ctl(m.epfd, libc::EPOLL_CTL_DEL, m.overlay, 0, 0);
            }
            None
        }
        (libc::EPOLL_CTL_MOD, Some((events, data))) => {
            let mut mirrors = MIRRORS.lock();
            if let Some(m) = mirrors
                .iter_mut()
                .find(|m| m.epfd == epfd && m.listener == fd)
            {
                if events & ONESHOT != 0 {
                    // Not mirrored (see the module's comment): withdrawn.
                    let gone = *m;
                    drop(mirrors);
                    take_mirrors(|m| *m == gone);
                    if gone.armed {
                        let _ = ctl(epfd, libc::EPOLL_CTL_DEL, gone.overlay, 0, 0);
                    }
                    return None;
                }
                if m.armed {
                    ctl(epfd, libc::EPOLL_CTL_MOD, m.overlay, events, data).ok()?;
                }
                m.events = events;
                m.data = data;
                return None;
            }
            drop(mirrors);
            // Not mirrored yet (its overlay listener was not listening then): as an ADD.
            add_mirror(epfd, fd, events, data)
        }
        (libc::EPOLL_CTL_ADD, Some((events, data))) => add_mirror(epfd, fd, events, data),
        _ => None,
    }
}

fn add_mirror(epfd: c_int, fd: c_int, events: u32, data: u64) -> Option<(Ipv4Addr, u16)> {
    if events & ONESHOT != 0 {
        // Not mirrored (see the module's comment); nor told to the router, which then rings
        // for this listener's plain clients without a grace.
        return None;
    }
    let (_, local, overlay) = crate::state::overlays_of_listeners([fd]).pop()?;
    if !real::is_listening(overlay) {
        return None;
    }
    // EEXIST: another fd of the same listener is mirrored in this instance already.
    ctl(epfd, libc::EPOLL_CTL_ADD, overlay, events, data).ok()?;
    MIRRORS.lock().push(Mirror {
        epfd,
        listener: fd,
        overlay,
        pid: real::getpid(),
        events,
        data,
        armed: true,
    });
    ANY_MIRROR.store(true, Ordering::Relaxed);
    (events & libc::EPOLLIN as u32 != 0).then_some(local)
}

/// Removes the mirrors `which` picks from the table, returning them.
fn take_mirrors(which: impl Fn(&Mirror) -> bool) -> Vec<Mirror> {
    let mut mirrors = MIRRORS.lock();
    let mut taken = Vec::new();
    mirrors.retain(|m| {
        let take = which(m);
        if take {
            taken.push(*m);
        }
        !take
    });
    taken
}

/// The application is about to close `fd` (or replace it with dup2/dup3): the mirrors of an
/// epoll instance, of a listener or of an overlay listener that goes with it are withdrawn
/// first (an overlay listener's registration would outlive its fd: the router holds the same
/// socket, and the kernel drops a registration only with the last reference to its file).
pub fn closing(fd: c_int) {
    closing_range(fd, fd);
}

/// As [`closing`], for every fd from `first` to `last`.
pub fn closing_range(first: c_int, last: c_int) {
    if !ANY_MIRROR.load(Ordering::Relaxed) {
        return;
    }
    let within = |fd: c_int| fd >= first && fd <= last;
    let gone = take_mirrors(|m| within(m.epfd) || within(m.listener) || within(m.overlay));
    if gone.is_empty() {
        return;
    }
    let me = real::getpid();
    for m in gone {
        if m.armed && m.pid == me && !within(m.epfd) {
            let _ = ctl(m.epfd, libc::EPOLL_CTL_DEL, m.overlay, 0, 0);
        }
    }
}

/// Overlay listener `overlay` is closed by the shim (its process's last fd of the listener
/// went): its mirrors registered by this process are withdrawn and forgotten.
pub fn release_overlay(overlay: c_int) {
    closing(overlay);
}

/// Overlay listener `overlay` stopped listening (no router; or found so at an accept): its
/// mirrors are withdrawn (a level-triggered instance would report its hang-up without end),
/// and kept to be registered again when it listens again ([`rearm_overlay`]).
pub fn withdraw_overlay(overlay: c_int) {
    if !ANY_MIRROR.load(Ordering::Relaxed) {
        return;
    }
    let mut mirrors = MIRRORS.lock();
    for m in mirrors
        .iter_mut()
        .filter(|m| m.overlay == overlay && m.armed)
    {
        let _ = ctl(m.epfd, libc::EPOLL_CTL_DEL, m.overlay, 0, 0);
        m.armed = false;
    }
}

/// Overlay listener `overlay` listens again: its withdrawn mirrors are registered again.
pub fn rearm_overlay(overlay: c_int) {
    if !ANY_MIRROR.load(Ordering::Relaxed) {
        return;
    }
    let mut mirrors = MIRRORS.lock();
    for m in mirrors
        .iter_mut()
        .filter(|m| m.overlay == overlay && !m.armed)
    {
        let added = ctl(m.epfd, libc::EPOLL_CTL_ADD, m.overlay, m.events, m.data);
        m.armed = matches!(added, Ok(()) | Err(libc::EEXIST));
    }
}

/// Mirrors the registrations an fd had before it became an accelerated listener (an
/// application that registered its socket before listen): `fd` now holds the host listener.
pub fn mirror_registered(fd: c_int) -> Vec<(Ipv4Addr, u16)> {
    registrations_of(fd)
        .into_iter()
        .filter_map(|r| add_mirror(r.epfd, fd, r.events, r.data))
        .collect()
}

/// One "tfd:" line of an epoll instance's fdinfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Watched {
    fd: c_int,
    events: u32,
    data: u64,
    inode: u64,
}

/// Parses lines like `tfd:        7 events:       19 data:                7  pos:0 ino:8d3 sdev:8`
/// (fd in decimal; events, data and inode in hex).
fn parse_fdinfo(info: &str) -> Vec<Watched> {
    let mut out = Vec::new();
    for line in info.lines().filter(|l| l.starts_with("tfd:")) {
        let mut fields = std::collections::HashMap::new();
        let mut tokens = line.split_whitespace();
        while let Some(key) = tokens.next() {
            if let Some((k, v)) = key.split_once(':').filter(|(_, v)| !v.is_empty()) {
                fields.insert(k, v);
            } else if let Some(value) = tokens.next() {
                fields.insert(key.trim_end_matches(':'), value);
            }
        }
        let parsed = (|| {
            Some(Watched {
                fd: fields.get("tfd")?.parse().ok()?,
                events: u32::from_str_radix(fields.get("events")?, 16).ok()?,
                data: u64::from_str_radix(fields.get("data")?, 16).ok()?,
                inode: u64::from_str_radix(fields.get("ino")?, 16).ok()?,
            })
        })();
        out.extend(parsed);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::{self, Accelerated, KeptOverlay, Role};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::{AsRawFd, FromRawFd};

    /// A host listener and an overlay listener (both on loopback, as kernel sockets), known to
    /// the shim as the accelerated listener of overlay address `local` and its overlay
    /// listener. Forgotten by the shim when dropped.
    pub(crate) struct Pair {
        pub host: TcpListener,
        /// Where the host listener listens (its clients connect there).
        pub host_addr: std::net::SocketAddr,
        pub overlay: TcpListener,
        pub local: (Ipv4Addr, u16),
    }

    impl Pair {
        pub(crate) fn new(local: (Ipv4Addr, u16)) -> Pair {
            let host = TcpListener::bind("127.0.0.1:0").unwrap();
            // Before the shim knows it: its getsockname then says the overlay address.
            let host_addr = host.local_addr().unwrap();
            let low = TcpListener::bind("127.0.0.1:0").unwrap();
            // At the shim's floor, as its duplicates are: above the application's low fds.
            let high = real::fcntl_set(low.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 256);
            assert!(high >= 256, "dup: {}", real::errno());
            // SAFETY: a fresh fd nobody else owns.
            let overlay = unsafe { TcpListener::from_raw_fd(high) };
            drop(low);
            state::insert(
                host.as_raw_fd(),
                Accelerated {
                    role: Role::Listener,
                    local,
                    peer: None,
                    v6: false,
                    wildcard: false,
                },
            );
            let fd = overlay.as_raw_fd();
            assert_eq!(
                state::keep_overlay_first(local, KeptOverlay { fd, backlog: 16 }),
                fd
            );
            Pair {
                host,
                host_addr,
                overlay,
                local,
            }
        }

        /// A client waiting on the overlay listener (a client without Freeflow).
        pub(crate) fn plain_client(&self) -> TcpStream {
            TcpStream::connect(self.overlay.local_addr().unwrap()).unwrap()
        }
    }

    impl Drop for Pair {
        fn drop(&mut self) {
            // Out of the table first: the close would tell a router otherwise.
            closing(self.host.as_raw_fd());
            closing(self.overlay.as_raw_fd());
            state::remove(self.host.as_raw_fd());
            state::take_overlay(self.local);
        }
    }

    /// What epoll_wait on `epfd` reports within `ms` (the data of each event).
    fn waited(epfd: c_int, ms: c_int) -> Vec<u64> {
        let mut ready = [libc::epoll_event { events: 0, u64: 0 }; 8];
        // SAFETY: epoll_wait writes at most 8 events into the live array.
        let n = unsafe { libc::epoll_wait(epfd, ready.as_mut_ptr(), 8, ms) };
        assert!(n >= 0, "epoll_wait: {}", real::errno());
        ready[..n as usize].iter().map(|e| e.u64).collect()
    }

    /// The application's epoll_ctl, then the shim's part of it.
    fn app_ctl(
        epfd: c_int,
        op: c_int,
        fd: c_int,
        events: u32,
        data: u64,
    ) -> Option<(Ipv4Addr, u16)> {
        ctl(epfd, op, fd, events, data).unwrap();
        let event = (op != libc::EPOLL_CTL_DEL).then_some((events, data));
        after_ctl(epfd, op, fd, event)
    }

    #[test]
    fn an_epoll_instance_watching_a_listener_wakes_for_its_overlay_listeners_clients() {
        let pair = Pair::new((Ipv4Addr::new(10, 77, 0, 1), 4001));
        let (host, overlay) = (pair.host.as_raw_fd(), pair.overlay.as_raw_fd());
        let epfd = real::epoll_create1(libc::EPOLL_CLOEXEC);
        assert!(epfd >= 0);
        let level = libc::EPOLLIN as u32;
        assert_eq!(
            app_ctl(epfd, libc::EPOLL_CTL_ADD, host, level, 0xabc),
            Some(pair.local)
        );
        assert!(waited(epfd, 0).is_empty(), "no client yet");
        let _client = pair.plain_client();
        assert_eq!(waited(epfd, 5000), vec![0xabc], "the listener's data");
        // Level-triggered: reported while the client waits; MOD follows (new data).
        assert_eq!(app_ctl(epfd, libc::EPOLL_CTL_MOD, host, level, 0xdef), None);
        assert_eq!(waited(epfd, 0), vec![0xdef]);
        // No router: the overlay listener stops listening (its clients get a reset). Its
        // hang-up must not wake a level-triggered instance again and again.
        assert_eq!(real::stop_listening(overlay), 0);
        withdraw_overlay(overlay);
        assert!(
            waited(epfd, 0).is_empty(),
            "a dead overlay listener is withdrawn"
        );
        // A new router: it listens again, and is watched again.
        assert_eq!(real::listen(overlay, 16), 0);
        rearm_overlay(overlay);
        let _client = pair.plain_client();
        assert_eq!(waited(epfd, 5000), vec![0xdef]);
        // DEL of the listener withdraws it.
        app_ctl(epfd, libc::EPOLL_CTL_DEL, host, 0, 0);
        assert!(
            waited(epfd, 0).is_empty(),
            "withdrawn with the listener's registration"
        );
        // And an ADD again, then the listener's close.
        app_ctl(epfd, libc::EPOLL_CTL_ADD, host, level, 0x1);
        assert_eq!(waited(epfd, 5000), vec![0x1]);
        closing(host);
        assert!(
            waited(epfd, 0).is_empty(),
            "withdrawn at the listener's close"
        );
        real::close(epfd);
    }

    #[test]
    fn an_oneshot_registration_is_not_mirrored() {
        let pair = Pair::new((Ipv4Addr::new(10, 77, 0, 2), 4002));
        let host = pair.host.as_raw_fd();
        let epfd = real::epoll_create1(libc::EPOLL_CLOEXEC);
        assert!(epfd >= 0);
        let oneshot = (libc::EPOLLIN | libc::EPOLLONESHOT) as u32;
        assert_eq!(
            app_ctl(epfd, libc::EPOLL_CTL_ADD, host, oneshot, 7),
            None,
            "not told to the router: its doorbells are wanted"
        );
        let _plain = pair.plain_client();
        assert!(waited(epfd, 0).is_empty(), "a plain client: no event");
        // The host listener's own client (or doorbell): one event until re-armed.
        let _accelerated = TcpStream::connect(pair.host_addr).unwrap();
        assert_eq!(waited(epfd, 5000), vec![7]);
        assert!(waited(epfd, 0).is_empty(), "disarmed until re-armed");
        // The C library's accept: the shim's would take a loopback client for a doorbell.
        // SAFETY: NULL address arguments.
        let taken = unsafe { real::accept4(host, std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        assert!(taken >= 0, "accept: {}", real::errno());
        real::close(taken);
        // MOD to level-triggered mirrors it; MOD back to EPOLLONESHOT withdraws the mirror.
        let level = libc::EPOLLIN as u32;
        assert_eq!(
            app_ctl(epfd, libc::EPOLL_CTL_MOD, host, level, 8),
            Some(pair.local)
        );
        assert_eq!(waited(epfd, 5000), vec![8], "the plain client, mirrored");
        assert_eq!(app_ctl(epfd, libc::EPOLL_CTL_MOD, host, oneshot, 9), None);
        assert!(waited(epfd, 0).is_empty(), "the mirror is withdrawn");
        assert!(MIRRORS.lock().iter().all(|m| m.listener != host));
        real::close(epfd);
    }

    /// A pipe (read end, write end), to register beside a listener.
    fn pipe() -> [c_int; 2] {
        let mut ends = [0; 2];
        // SAFETY: pipe writes two fds into a live array.
        assert_eq!(unsafe { libc::pipe(ends.as_mut_ptr()) }, 0);
        ends
    }

    fn put_byte(fd: c_int) {
        // SAFETY: writes one byte from a live buffer.
        assert_eq!(unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) }, 1);
    }

    fn take_byte(fd: c_int) {
        let mut byte = 0u8;
        // SAFETY: reads one byte into a live buffer.
        let got = unsafe { libc::read(fd, (&mut byte as *mut u8).cast(), 1) };
        assert_eq!(got, 1);
    }

    #[test]
    fn an_oneshot_listener_is_not_disarmed_by_another_fds_event_with_the_same_data() {
        let pair = Pair::new((Ipv4Addr::new(10, 77, 0, 4), 4004));
        let host = pair.host.as_raw_fd();
        let epfd = real::epoll_create1(libc::EPOLL_CLOEXEC);
        assert!(epfd >= 0);
        let oneshot = (libc::EPOLLIN | libc::EPOLLONESHOT) as u32;
        // One handler for both (its pointer as their data; 0 here, as many programs leave it).
        app_ctl(epfd, libc::EPOLL_CTL_ADD, host, oneshot, 0);
        let [readable, writable] = pipe();
        app_ctl(epfd, libc::EPOLL_CTL_ADD, readable, libc::EPOLLIN as u32, 0);
        put_byte(writable);
        assert_eq!(waited(epfd, 5000), vec![0], "the pipe's event");
        take_byte(readable);
        // The listener is still armed: its client is reported.
        let _accelerated = TcpStream::connect(pair.host_addr).unwrap();
        assert_eq!(waited(epfd, 5000), vec![0], "the listener's event");
        assert!(waited(epfd, 0).is_empty(), "disarmed until re-armed");
        // Both ready in one call: both reported.
        put_byte(writable);
        app_ctl(epfd, libc::EPOLL_CTL_MOD, host, oneshot, 0);
        assert_eq!(
            waited(epfd, 5000),
            vec![0, 0],
            "the listener's and the pipe's"
        );
        for fd in [epfd, readable, writable] {
            real::close(fd);
        }
    }

    #[test]
    fn exclusive_registrations_of_two_workers_each_see_plain_clients() {
        let pair = Pair::new((Ipv4Addr::new(10, 77, 0, 3), 4003));
        let host = pair.host.as_raw_fd();
        let exclusive = (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32;
        // Two workers' instances, as nginx's (each forked worker makes its own, and registers
        // the shared listener with EPOLLEXCLUSIVE, which the mirror keeps: while they wait,
        // the kernel wakes one of them per client; idle, each finds the client ready).
        let epfds = [0, 1].map(|_| real::epoll_create1(libc::EPOLL_CLOEXEC));
        for (i, &epfd) in epfds.iter().enumerate() {
            assert!(epfd >= 0);
            app_ctl(epfd, libc::EPOLL_CTL_ADD, host, exclusive, i as u64);
        }
        let _plain = pair.plain_client();
        assert_eq!(waited(epfds[0], 5000), vec![0]);
        assert_eq!(waited(epfds[1], 5000), vec![1]);
        // EPOLL_CTL_MOD of an exclusive registration is refused to the application (EINVAL):
        // the mirror is left as it is.
        let mut event = libc::epoll_event {
            events: exclusive,
            u64: 9,
        };
        // SAFETY: a live epoll_event.
        let rc = unsafe { real::epoll_ctl(epfds[0], libc::EPOLL_CTL_MOD, host, &mut event) };
        assert_eq!((rc, real::errno()), (-1, libc::EINVAL));
        assert_eq!(waited(epfds[0], 5000), vec![0]);
        for epfd in epfds {
            closing(epfd);
            real::close(epfd);
        }
    }

    #[test]
    fn fdinfo_lines_are_parsed() {
        let info = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n\
                    tfd:        7 events:       19 data:                7  pos:0 ino:8d3 sdev:8\n\
                    tfd:       12 events: 80000001 data: ffffffffffffffff  pos:0 ino:1a2b sdev:9\n\
                    tfd: garbage\n";
        assert_eq!(
            parse_fdinfo(info),
            vec![
                Watched {
                    fd: 7,
                    events: 0x19,
                    data: 7,
                    inode: 0x8d3
                },
                Watched {
                    fd: 12,
                    events: 0x8000_0001,
                    data: u64::MAX,
                    inode: 0x1a2b
                },
            ]
        );
    }

    #[test]
    fn a_registration_moves_to_the_replacing_socket() {
        let epfd = real::epoll_create1(libc::EPOLL_CLOEXEC);
        assert!(epfd >= 0);
        created(epfd);
        let mut pair = [0; 2];
        // SAFETY: socketpair writes two fds into a live array.
        let rc =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) };
        assert_eq!(rc, 0);
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: 0xfeed,
        };
        // SAFETY: a live epoll_event.
        let rc = unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, pair[0], &mut event) };
        assert_eq!(rc, 0);
        let before = registrations_of(pair[0]);
        // The kernel always adds EPOLLERR and EPOLLHUP to the interest it reports.
        let always = (libc::EPOLLERR | libc::EPOLLHUP) as u32;
        assert_eq!(
            before,
            vec![Registration {
                epfd,
                events: (libc::EPOLLIN | libc::EPOLLET) as u32 | always,
                data: 0xfeed
            }]
        );
        // Swap pair[0] for a fresh socket pair's end, as the shim swaps in a host socket.
        let mut other = [0; 2];
        // SAFETY: as above.
        let rc =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, other.as_mut_ptr()) };
        assert_eq!(rc, 0);
        assert!(real::dup3(other[0], pair[0], 0) >= 0);
        assert!(
            registrations_of(pair[0]).is_empty(),
            "the kernel dropped it"
        );
        restore(pair[0], &before);
        // SAFETY: writes one byte from a live buffer.
        assert_eq!(unsafe { libc::write(other[1], b"x".as_ptr().cast(), 1) }, 1);
        let mut ready = [libc::epoll_event { events: 0, u64: 0 }; 4];
        // SAFETY: epoll_wait writes at most 4 events into the live array.
        let n = unsafe { libc::epoll_wait(epfd, ready.as_mut_ptr(), 4, 2000) };
        assert_eq!(n, 1);
        let got = ready[0];
        assert_eq!({ got.u64 }, 0xfeed);
        for fd in [epfd, pair[0], pair[1], other[0], other[1]] {
            real::close(fd);
        }
        closed(epfd);
    }
}
