//! Epoll registrations made on a socket before the shim swaps it for a host socket.
//!
//! The swap (dup3 of the host socket onto the application's fd) closes the original socket, and
//! the kernel drops every epoll registration of a closed file; the application would never hear
//! from its fd again. So before a swap the shim reads which of the process's epoll instances
//! watch the fd (the kernel lists them in /proc/self/fdinfo/<epfd>), and after it adds the same
//! events and data for the new socket. The shim knows the process's epoll instances by
//! wrapping epoll_create/epoll_create1: nothing is tracked on the epoll_ctl/epoll_wait path.

use crate::forklock::ForkLock;
use crate::real;
use libc::c_int;
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
        unsafe { libc::epoll_ctl(r.epfd, libc::EPOLL_CTL_DEL, fd, &mut unused) };
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
        let rc = unsafe { libc::epoll_ctl(r.epfd, libc::EPOLL_CTL_ADD, fd, &mut event) };
        if rc != 0 && real::errno() == libc::EEXIST {
            // SAFETY: as above.
            unsafe { libc::epoll_ctl(r.epfd, libc::EPOLL_CTL_MOD, fd, &mut event) };
        }
    }
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
mod tests {
    use super::*;

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
