//! Waiting for readiness on a few descriptors with `poll(2)`: the router's control loop, the
//! daemon's and the demo's wait for signals, the attach handshake's hang-up check, the socket
//! shim's wait for a connect and for its router to go away.
#![allow(unsafe_code)]

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// One descriptor to wait on, the events asked for, and (after [`poll`]) the events that
/// happened. The same memory as the kernel's `struct pollfd`, so a slice of them is passed as is.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct PollFd<'fd> {
    raw: libc::pollfd,
    /// The descriptor stays open while this borrows it.
    fd: PhantomData<BorrowedFd<'fd>>,
}

impl<'fd> PollFd<'fd> {
    /// Waits on `fd` for `events` (`libc::POLLIN`, `POLLOUT`, ...; hang-up and error are always
    /// reported, so `0` waits for those alone).
    pub fn new(fd: BorrowedFd<'fd>, events: i16) -> PollFd<'fd> {
        PollFd {
            raw: libc::pollfd {
                fd: fd.as_raw_fd(),
                events,
                revents: 0,
            },
            fd: PhantomData,
        }
    }

    /// The events that happened (0 if none, or before [`poll`] ran).
    pub fn revents(&self) -> i16 {
        self.raw.revents
    }
}

/// Waits until one of `fds` is ready or `timeout` passes (`None`: no limit; a timeout is rounded
/// up to whole milliseconds, so a short wait does not become none). Returns how many are ready
/// (0: timed out); each one's [`PollFd::revents`] tells what happened. A signal handler that
/// interrupts the wait gives `Err` of kind `Interrupted`.
pub fn poll(fds: &mut [PollFd<'_>], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = match timeout {
        None => -1,
        Some(t) => t.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int,
    };
    for fd in fds.iter_mut() {
        fd.raw.revents = 0;
    }
    // SAFETY: PollFd is a transparent `struct pollfd`, so `fds` is a valid, exclusively borrowed
    // array of `fds.len()` pollfds; poll writes only their `revents` fields. The descriptors are
    // borrowed, so open for the call.
    let n = unsafe {
        libc::poll(
            fds.as_mut_ptr().cast::<libc::pollfd>(),
            fds.len() as libc::nfds_t,
            ms,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Waits up to `timeout` until one of `fds` is readable (or hung up); one flag per fd. An
/// interrupted wait returns all false.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<Vec<bool>> {
    let mut polled: Vec<PollFd<'_>> = fds
        .iter()
        .map(|&fd| PollFd::new(fd, libc::POLLIN))
        .collect();
    match poll(&mut polled, Some(timeout)) {
        Ok(_) => Ok(polled.iter().map(|p| p.revents() != 0).collect()),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(vec![false; fds.len()]),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn readiness_is_reported_per_descriptor() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let (_c, d) = UnixStream::pair().unwrap();
        let quiet = poll_readable(&[b.as_fd(), d.as_fd()], Duration::from_millis(1)).unwrap();
        assert_eq!(quiet, [false, false]);
        a.write_all(b"x").unwrap();
        let ready = poll_readable(&[b.as_fd(), d.as_fd()], Duration::from_secs(5)).unwrap();
        assert_eq!(ready, [true, false]);
    }

    #[test]
    fn hang_up_is_reported_without_asking() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut fds = [PollFd::new(b.as_fd(), 0)];
        assert_eq!(poll(&mut fds, Some(Duration::ZERO)).unwrap(), 0);
        drop(a);
        assert_eq!(poll(&mut fds, None).unwrap(), 1);
        assert_ne!(fds[0].revents() & libc::POLLHUP, 0);
    }
}
