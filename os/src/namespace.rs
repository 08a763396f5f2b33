//! Linux namespaces: what kind of namespace a namespace file (`/proc/PID/ns/*`, a bind mount of
//! one under `/run/netns`) refers to.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The kind of namespace a namespace file refers to (`CLONE_NEWNET` for a network namespace);
/// an error (ENOTTY, EINVAL) if `file` is not a namespace file at all.
pub fn namespace_type(file: &File) -> io::Result<i32> {
    /// `_IO(0xb7, 0x3)` from linux/nsfs.h.
    const NS_GET_NSTYPE: u32 = 0xb703;
    // SAFETY: NS_GET_NSTYPE takes no argument and writes no memory; `file` keeps the descriptor
    // open for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_type_of_own_netns() {
        let f = File::open("/proc/self/ns/net").unwrap();
        assert_eq!(namespace_type(&f).unwrap(), libc::CLONE_NEWNET);
        let f = File::open("/proc/self/ns/mnt").unwrap();
        assert_eq!(namespace_type(&f).unwrap(), libc::CLONE_NEWNS);
        let f = File::open("/proc/self/status").unwrap();
        assert!(namespace_type(&f).is_err());
    }
}
