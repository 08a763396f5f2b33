//! The operating-system calls of the control plane: `freeflow-os`'s, and the three that only the
//! control plane needs (how the router's child process is prepared, how a lock file is opened,
//! and a lock taken without waiting that answers whether it was free). No unsafe code: the
//! system calls are `freeflow-os`'s and std's.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;

pub use freeflow_os::namespace::namespace_type;
pub use freeflow_os::poll::poll_readable;
pub use freeflow_os::process::{new_session_on_exec, process_exists, Pidfd};
pub use freeflow_os::signals::{send_signal, SignalFd, TERMINATION_SIGNALS};

/// Opens the lock file `path` for reading and writing, creating it with `mode` if it is
/// missing and never truncating it (its contents, if any, belong to whoever wrote them).
pub fn open_lock_file(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(mode)
        .open(path)
}

/// Takes an exclusive flock without waiting: `Ok(true)` if we now hold it, `Ok(false)` if
/// another open file description holds it.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Prepares the router's child process: it inherits `ready_fd` (the write end of its
/// readiness pipe) and runs in a session of its own. It is not tied to the daemon's life (no
/// PR_SET_PDEATHSIG) and not in the daemon's process group: a daemon that dies, or a signal to
/// the daemon's group or terminal, leaves the dataplane serving; the daemon stops it explicitly
/// when it shuts down, and a new daemon adopts it.
pub fn prepare_router_child(cmd: &mut Command, ready_fd: RawFd) {
    freeflow_os::process::new_session_on_exec(cmd);
    // Clear close-on-exec so the router inherits its readiness pipe.
    freeflow_os::process::keep_fd_on_exec(cmd, ready_fd);
}
