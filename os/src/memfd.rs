//! Sealed memory files (`memfd_create(2)`): the region that holds an attachment's rings, and the
//! memory file a verbs process registers its memory in. Seals are what let the router map a
//! file a container gave it without fearing that it shrinks under the mapping.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// The seals the router requires of a file it maps: it can neither shrink nor grow, nor change
/// seals again.
pub const FIXED_SIZE_SEALS: i32 = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// A new, empty memory file named `name` (the name shows in `/proc/PID/fd` and `maps`),
/// close-on-exec and sealable.
pub fn create(name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a NUL-terminated string that outlives the call; the flags are constants.
    let raw =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Adds `seals` (`libc::F_SEAL_*`) to a memory file.
pub fn add_seals(fd: BorrowedFd<'_>, seals: i32) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS takes an int argument and touches no memory; the descriptor is
    // borrowed, so open for the call.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The seals of a file. Fails (EINVAL) for a file that cannot be sealed: anything but a memory
/// file or shmem.
pub fn seals(fd: BorrowedFd<'_>) -> io::Result<i32> {
    // SAFETY: F_GET_SEALS takes no argument and touches no memory; the descriptor is borrowed.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(seals)
}

/// A new memory file of `size` bytes (sparse: pages are allocated when written) carrying
/// `seals` (0: none).
pub fn sized(name: &CStr, size: u64, seals: i32) -> io::Result<OwnedFd> {
    let file = File::from(create(name)?);
    file.set_len(size)?;
    let fd = OwnedFd::from(file);
    if seals != 0 {
        add_seals(std::os::fd::AsFd::as_fd(&fd), seals)?;
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_sealed_file_keeps_its_size() {
        let fd = sized(c"ff-os-test", 1 << 20, FIXED_SIZE_SEALS).unwrap();
        assert_eq!(
            seals(fd.as_fd()).unwrap() & FIXED_SIZE_SEALS,
            FIXED_SIZE_SEALS
        );
        let file = File::from(fd);
        assert_eq!(file.metadata().unwrap().len(), 1 << 20);
        assert!(file.set_len(4096).is_err());
        assert!(file.set_len(2 << 20).is_err());
    }

    #[test]
    fn an_unsealed_file_can_be_sealed_later() {
        let fd = sized(c"ff-os-test", 4096, 0).unwrap();
        assert_eq!(seals(fd.as_fd()).unwrap() & FIXED_SIZE_SEALS, 0);
        add_seals(fd.as_fd(), libc::F_SEAL_SHRINK).unwrap();
        assert_eq!(
            seals(fd.as_fd()).unwrap() & libc::F_SEAL_SHRINK,
            libc::F_SEAL_SHRINK
        );
        let null = File::open("/dev/null").unwrap();
        assert!(seals(null.as_fd()).is_err());
    }
}
