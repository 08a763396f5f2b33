//! Completion channels on the router's side: a pipe per channel. The shim gets the read end (the
//! program's `channel->fd`, which works with poll/epoll); the router keeps the write end and
//! writes the 4-byte handle of each CQ that fires a notification.
//!
//! Why a pipe and not an eventfd: an eventfd is one open file, shared by both processes. A
//! container could clear O_NONBLOCK on it (file status flags belong to the shared open file) and
//! fill its counter to the maximum, and the router's next write would block its shard forever.
//! A pipe's two ends are separate open files: the container can change only its read end, the
//! write end stays non-blocking, and a full pipe (a program that never reads its events) costs
//! the router an EAGAIN, not a stall. A closed read end gives EPIPE (SIGPIPE is ignored in Rust
//! programs), also harmless.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A new pipe: (read end, write end), both close-on-exec. The write end is non-blocking; the
/// read end is blocking, as rdma-core's channel fds are (a program may make it non-blocking).
pub fn channel_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1i32; 2];
    // SAFETY: pipe2 writes two fds into the array we pass; the result is checked.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_GETFL/F_SETFL on our own fd; O_NONBLOCK applies to the write end's open file
    // only (the read end is a different open file).
    unsafe {
        let flags = libc::fcntl(write.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(write.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((read, write))
}

/// Writes the handle of a notified CQ into a channel's pipe. Never blocks; a full or closed pipe
/// loses the notification (see the module comment: only a program that does not read its
/// events, or has closed them, fills its pipe).
pub fn notify(write_end: &OwnedFd, cq_handle: u32) {
    let bytes = cq_handle.to_le_bytes();
    // SAFETY: writes 4 bytes from a live array to a non-blocking fd we own; 4 bytes is below
    // PIPE_BUF, so the write is atomic (all or nothing).
    let _ = unsafe { libc::write(write_end.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
}

/// Writes one record (at most PIPE_BUF bytes, so whole or not at all) into a pipe's
/// non-blocking write end; false if it could not (a full or closed pipe).
pub fn write_record(write_end: &OwnedFd, record: &[u8]) -> bool {
    debug_assert!(record.len() <= libc::PIPE_BUF);
    // SAFETY: writes `record.len()` bytes from a live slice to a non-blocking fd we own.
    let n = unsafe { libc::write(write_end.as_raw_fd(), record.as_ptr().cast(), record.len()) };
    n == record.len() as isize
}

/// A connected pair of SOCK_SEQPACKET sockets (the engine's tests stand in for an attach
/// connection with one).
#[cfg(test)]
pub fn test_seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [-1i32; 2];
    // SAFETY: socketpair writes two fds into the array; the result is checked.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair");
    // SAFETY: both fds are fresh and ours.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_arrive_and_a_full_pipe_does_not_block() {
        let (read, write) = channel_pipe().unwrap();
        notify(&write, 7);
        let mut buf = [0u8; 4];
        // SAFETY: reads 4 bytes into a live buffer.
        let n = unsafe { libc::read(read.as_raw_fd(), buf.as_mut_ptr().cast(), 4) };
        assert_eq!(n, 4);
        assert_eq!(u32::from_le_bytes(buf), 7);
        // Nobody reads: the pipe fills and the writer carries on.
        for i in 0..100_000 {
            notify(&write, i);
        }
        drop(read);
        notify(&write, 1);
    }
}
