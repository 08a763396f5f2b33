//! The descriptors the shim holds for itself (the router connection, the watcher's copy of it),
//! kept out of the application's way.
//!
//! The application does not know these descriptors exist, yet it can reach them by number:
//! a daemon closes every fd from 3 up, a server calls `closefrom(3)` or `close_range`, a
//! program `dup2`s a file onto a number it thinks is free. Closing the router connection under
//! the shim would, at best, end acceleration; at worst the number is reused by the next file
//! the application opens and the shim writes its requests into that file. So:
//! - a private fd lives at a high number (half the soft RLIMIT_NOFILE, at most 512), away from
//!   the low numbers programs reuse;
//! - close() of a private fd, and close_range/closefrom over one, leave it open (to the
//!   application the number was never open: close says EBADF);
//! - dup2/dup3 onto a private number first moves the shim's fd to another number, then the
//!   application gets the number it asked for.
//!
//! A private fd's current number lives in a static slot, so a move updates every holder at once.

use crate::real;
use libc::c_int;
use std::os::fd::{BorrowedFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

/// Private fds at most: the router connection and the watcher's duplicate, with room for the
/// moment a replacement session and the old one both exist.
const SLOTS: usize = 16;
const FREE: c_int = -1;
/// A slot being filled: taken, its number not yet known.
const FILLING: c_int = -2;

static HELD: [AtomicI32; SLOTS] = [const { AtomicI32::new(FREE) }; SLOTS];

/// The lowest number a private fd is moved to.
fn floor() -> c_int {
    let soft = freeflow_os::process::open_file_limit().map_or(1024, |(soft, _)| soft);
    c_int::try_from((soft / 2).min(512)).unwrap_or(512).max(3)
}

/// Whether `fd` is one of the shim's own descriptors.
pub fn is_held(fd: c_int) -> bool {
    fd >= 0 && HELD.iter().any(|s| s.load(Ordering::Acquire) == fd)
}

/// The shim's own descriptors numbered `first..=last`, in increasing order.
pub fn held_in(first: c_int, last: c_int) -> Vec<c_int> {
    let mut fds: Vec<c_int> = HELD
        .iter()
        .map(|s| s.load(Ordering::Acquire))
        .filter(|&fd| fd >= first && fd <= last)
        .collect();
    fds.sort_unstable();
    fds.dedup();
    fds
}

/// The application asks for number `fd` (dup2/dup3 onto it): if the shim holds it, the shim's
/// descriptor moves to another number first. False when it could not move (no free number):
/// the caller fails the application's call with errno set.
pub fn make_room(fd: c_int) -> bool {
    let Some(slot) = HELD.iter().find(|s| s.load(Ordering::Acquire) == fd) else {
        return true;
    };
    let moved = real::fcntl_set(fd, libc::F_DUPFD_CLOEXEC, floor());
    if moved < 0 {
        return false;
    }
    if slot
        .compare_exchange(fd, moved, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        // Moved or released meanwhile by another thread: this copy is not needed.
        real::close(moved);
        return true;
    }
    // The old number is the application's now: its dup3 replaces it. A thread of the shim
    // that read the old number just before the move may still use it once; the window is the
    // few instructions between loading a slot and its system call.
    true
}

/// Closes the shim's descriptor `fd` whose owner will never drop it (in a forked child, the
/// copy a thread of the parent held: that thread did not come along). False if `fd` is not held.
pub fn close_orphan(fd: c_int) -> bool {
    let Some(slot) = HELD.iter().find(|s| s.load(Ordering::Acquire) == fd) else {
        return false;
    };
    if slot
        .compare_exchange(fd, FREE, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
    {
        real::close(fd);
    }
    true
}

/// A descriptor the shim owns, kept out of the application's way (see the module doc). Falls
/// back to an ordinary descriptor when every slot is taken.
#[derive(Debug)]
pub struct PrivateFd(Storage);

#[derive(Debug)]
enum Storage {
    Slot(usize),
    Plain(OwnedFd),
}

impl PrivateFd {
    /// Takes `fd` over, moving it to a high number.
    pub fn adopt(fd: OwnedFd) -> PrivateFd {
        let Some(index) = HELD.iter().position(|s| {
            s.compare_exchange(FREE, FILLING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        }) else {
            return PrivateFd(Storage::Plain(fd));
        };
        let raw = fd.into_raw_fd();
        let moved = real::fcntl_set(raw, libc::F_DUPFD_CLOEXEC, floor());
        let number = if moved >= 0 {
            real::close(raw);
            moved
        } else {
            raw
        };
        HELD[index].store(number, Ordering::Release);
        PrivateFd(Storage::Slot(index))
    }

    pub fn as_raw_fd(&self) -> c_int {
        match &self.0 {
            Storage::Slot(index) => HELD[*index].load(Ordering::Acquire),
            Storage::Plain(fd) => std::os::fd::AsRawFd::as_raw_fd(fd),
        }
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the number is open for as long as self lives: the slot holds it until drop,
        // close() and close_range() from the application leave it open, and a move (dup2 onto
        // it) opens the new number before the old one is replaced.
        unsafe { BorrowedFd::borrow_raw(self.as_raw_fd()) }
    }

    /// Another private descriptor for the same file.
    pub fn try_clone(&self) -> std::io::Result<PrivateFd> {
        let copy = real::fcntl_set(self.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor());
        if copy < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fcntl just made `copy`, and nothing else owns it.
        let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(copy) };
        Ok(PrivateFd::adopt(owned))
    }
}

impl Drop for PrivateFd {
    fn drop(&mut self) {
        if let Storage::Slot(index) = self.0 {
            let fd = HELD[index].swap(FREE, Ordering::AcqRel);
            if fd >= 0 {
                real::close(fd);
            }
        }
        // A plain OwnedFd closes itself (through the shim's close, which lets it through: it
        // is not held).
    }
}
