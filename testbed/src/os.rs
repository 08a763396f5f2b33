//! The test bed's two system calls that std does not offer: the effective uid (root is needed to
//! build namespaces) and SIGKILL for the processes left in a namespace being removed. The only
//! module of this crate with unsafe code.

#![allow(unsafe_code)]

/// The effective uid of this process.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

/// Send SIGKILL to process `pid`; errors (the process is already gone) are ignored. `pid` must
/// be positive: 0 and negative values would signal process groups, so they are refused here.
pub(crate) fn kill_process(pid: libc::pid_t) {
    if pid <= 0 {
        return;
    }
    // SAFETY: kill takes plain integers and touches no memory; pid is positive (checked above),
    // not 0 or -1, so it names one process and cannot signal a process group.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}
