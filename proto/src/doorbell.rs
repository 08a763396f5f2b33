//! Doorbells that wake a parked ring consumer: a futex on the ring's shared `parked` word (for a
//! shim waiting on one ring) and an eventfd (for a router shard that waits on many rings and its
//! io_uring at once).

use freeflow_os::poll::{poll, PollFd};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Sleeps while `*word == expected`, at most `timeout`. Works across processes (the futex is not
/// private), so the word may live in a shared mapping. Returns on wake, timeout, signal or if
/// the word already differs; callers re-check their condition in every case.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a live, aligned u32 for the duration of the call; FUTEX_WAIT only reads
    // it; ts_ptr is NULL or points at a live timespec.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
        )
    };
}

/// Wakes up to `count` waiters on `word`.
pub fn futex_wake(word: &AtomicU32, count: u32) {
    // SAFETY: `word` is a live, aligned u32; FUTEX_WAKE does not access memory beyond hashing
    // its address.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, count) };
}

/// A non-blocking eventfd used as a doorbell.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A new doorbell, non-blocking and close-on-exec.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(EventFd { fd })
    }

    /// Another handle on the same doorbell (a dup of the fd).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(EventFd {
            fd: self.fd.try_clone()?,
        })
    }

    /// Wraps an eventfd received from another process.
    pub fn from_owned(fd: OwnedFd) -> Self {
        EventFd { fd }
    }

    /// Rings the bell. A full counter (EAGAIN) already means "wake up", so it is not an error.
    pub fn ring(&self) -> io::Result<()> {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an fd we hold.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if n == 8 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::WouldBlock {
            return Ok(());
        }
        Err(err)
    }

    /// Resets the counter; returns how many rings it held (0 if none).
    pub fn drain(&self) -> u64 {
        let mut value: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
        if n == 8 {
            value
        } else {
            0
        }
    }

    /// Blocks until the bell rings or `timeout` passes (poll on the fd). Returns true if rung.
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut fds = [PollFd::new(self.fd.as_fd(), libc::POLLIN)];
        poll(&mut fds, Some(timeout)).is_ok_and(|n| n > 0)
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
