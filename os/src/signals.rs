//! Signals as a file descriptor: the daemon, the router, the demo and the bench block the
//! termination signals before they start threads and read them from a signalfd, so that a
//! signal is an event of their loop (and their teardown runs) rather than an asynchronous
//! handler. Also sending a signal to one process.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Signals that ask a Freeflow process to stop.
pub const TERMINATION_SIGNALS: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Size of `struct signalfd_siginfo`, what one read of a signalfd returns per signal.
const SIGINFO_SIZE: usize = std::mem::size_of::<libc::signalfd_siginfo>();

/// Signals blocked for the calling thread (and the threads it starts later) and read, when they
/// arrive, from a descriptor.
#[derive(Debug)]
pub struct SignalFd {
    file: File,
}

impl SignalFd {
    /// Blocks `signals` in the calling thread (call it before starting threads, so that every
    /// thread inherits the mask; children started with `Command` get an empty mask again) and
    /// returns a non-blocking, close-on-exec signalfd for them.
    pub fn block(signals: &[i32]) -> io::Result<SignalFd> {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset initialises the set it is pointed at and cannot fail.
        unsafe { libc::sigemptyset(set.as_mut_ptr()) };
        // SAFETY: initialised by sigemptyset just above.
        let mut set = unsafe { set.assume_init() };
        for &sig in signals {
            // SAFETY: `set` is an initialised sigset; an invalid number only yields EINVAL.
            if unsafe { libc::sigaddset(&mut set, sig) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: `set` is a valid sigset; the old mask is not asked for (null).
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: -1 asks for a new descriptor; `set` is valid for the call.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a fresh descriptor that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(SignalFd {
            file: File::from(owned),
        })
    }

    /// The signals that arrived since the last call (each standard signal at most once).
    pub fn drain(&self) -> io::Result<Vec<i32>> {
        let mut buf = [0u8; SIGINFO_SIZE * 8];
        let mut out = Vec::new();
        loop {
            match (&self.file).read(&mut buf) {
                Ok(0) => return Ok(out),
                Ok(n) => out.extend(buf[..n].chunks_exact(SIGINFO_SIZE).map(signal_number)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(out),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsFd for SignalFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl From<SignalFd> for OwnedFd {
    fn from(signals: SignalFd) -> OwnedFd {
        OwnedFd::from(signals.file)
    }
}

/// Reads one pending signal from `signalfd` (a [`SignalFd`] kept as a plain descriptor):
/// `Ok(None)` if none is pending (the descriptor is non-blocking).
pub fn read_one(signalfd: BorrowedFd<'_>) -> io::Result<Option<i32>> {
    let mut info = [0u8; SIGINFO_SIZE];
    // SAFETY: read writes at most `info.len()` bytes into the live local buffer; the descriptor
    // is borrowed, so open for the call.
    let n = unsafe { libc::read(signalfd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
    if n == SIGINFO_SIZE as isize {
        return Ok(Some(signal_number(&info)));
    }
    if n >= 0 {
        return Ok(None);
    }
    let err = io::Error::last_os_error();
    match err.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
        _ => Err(err),
    }
}

/// The signal number of one `struct signalfd_siginfo` (its first field, `ssi_signo`, a u32).
fn signal_number(info: &[u8]) -> i32 {
    u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as i32
}

/// Sends `sig` to process `pid` (never to a group: `pid` must be positive).
pub fn send_signal(pid: i32, sig: i32) -> io::Result<()> {
    if pid <= 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to signal pid {pid}"),
        ));
    }
    // SAFETY: kill takes two integers; a positive pid addresses exactly one process.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_signal_is_read_from_the_descriptor() {
        // SIGUSR2 only: the test harness runs tests on threads, and a termination signal sent
        // to the process could reach another thread that does not block it.
        let signals = SignalFd::block(&[libc::SIGUSR2]).unwrap();
        assert_eq!(signals.drain().unwrap(), Vec::<i32>::new());
        assert_eq!(read_one(signals.as_fd()).unwrap(), None);
        // SAFETY: pthread_kill on the calling thread, whose handle pthread_self returns.
        let rc = unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGUSR2) };
        assert_eq!(rc, 0);
        assert_eq!(signals.drain().unwrap(), vec![libc::SIGUSR2]);
        // SAFETY: as above.
        let rc = unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGUSR2) };
        assert_eq!(rc, 0);
        let fd = OwnedFd::from(signals);
        assert_eq!(read_one(fd.as_fd()).unwrap(), Some(libc::SIGUSR2));
        assert_eq!(read_one(fd.as_fd()).unwrap(), None);
    }

    #[test]
    fn groups_are_never_signalled() {
        assert!(send_signal(0, 0).is_err());
        assert!(send_signal(-1, 0).is_err());
        send_signal(std::process::id() as i32, 0).unwrap();
    }
}
