//! Processes: what a child started with `Command` does between fork and exec (each step a
//! `pre_exec` hook; hooks run in the order they were added), and facts about processes that std
//! does not tell.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The child starts a new session (no controlling terminal, its own process group), so a
/// terminal's Ctrl-C or hangup does not reach it.
pub fn new_session_on_exec(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls setsid, which is
    // async-signal-safe; it allocates nothing (last_os_error does not allocate).
    unsafe {
        cmd.pre_exec(|| {
            // SAFETY: setsid has no memory arguments; failing (already a group leader) is
            // reported as an error and aborts the spawn.
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The child gets `signal` when the calling process dies (PR_SET_PDEATHSIG), so a parent killed
/// with SIGKILL leaves no unsupervised child behind. If the parent died before that took
/// effect, the child does not start at all (the spawn fails with ESRCH).
pub fn die_with_parent_on_exec(cmd: &mut Command, signal: i32) {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec and only calls prctl and
    // getppid, which are async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // SAFETY: PR_SET_PDEATHSIG takes a signal number; the other arguments are unused
            // integers.
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect: then nobody supervises us,
            // so do not start at all.
            // SAFETY: getppid has no preconditions.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// The child inherits `fd` across exec (its close-on-exec flag is cleared in the child only).
/// The caller keeps `fd` open until the child is spawned.
pub fn keep_fd_on_exec(cmd: &mut Command, fd: RawFd) {
    // SAFETY: the closure runs in the forked child before exec and only calls fcntl, which is
    // async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // SAFETY: F_SETFD with 0 only changes the descriptor flags of `fd`, which the parent
            // keeps open across the fork.
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Whether process `pid` exists (zombies included).
pub fn process_exists(pid: i32) -> bool {
    pid > 0 && std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The effective user id of this process (0: root).
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

/// Clock ticks per second, the unit of the CPU times in `/proc/PID/stat` (at least 1).
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf takes an integer and touches no memory of ours.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64
}

/// This process's limit on open descriptors (RLIMIT_NOFILE): (soft, hard). An unlimited value
/// is `u64::MAX`.
pub fn open_file_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one struct rlimit into `limit`, which lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// Raises this process's soft limit on open descriptors to its hard limit, as many daemons do
/// (the soft default of 1024 only protects programs that use `select`). An unlimited hard limit
/// means the kernel's own ceiling, `fs.nr_open`. Returns (the soft limit before, the one now).
pub fn raise_open_file_limit() -> io::Result<(u64, u64)> {
    let (soft, hard) = open_file_limit()?;
    let target = if hard == libc::RLIM_INFINITY {
        read_number("/proc/sys/fs/nr_open")?
    } else {
        hard
    };
    if soft >= target {
        return Ok((soft, soft));
    }
    let limit = libc::rlimit {
        rlim_cur: target,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads one struct rlimit, which lives across the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((soft, target))
}

/// The most memory mappings a process may hold (`vm.max_map_count`).
pub fn max_map_count() -> io::Result<u64> {
    read_number("/proc/sys/vm/max_map_count")
}

/// The number a /proc file holds.
fn read_number(path: &str) -> io::Result<u64> {
    std::fs::read_to_string(path)?
        .trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::process::Stdio;

    #[test]
    fn a_child_gets_its_own_session_and_the_kept_descriptor() {
        let (reader, writer) = std::io::pipe().unwrap();
        let writer = OwnedFd::from(writer);
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "read pid comm state ppid group session rest </proc/self/stat; \
                 echo $session $$ >&{fd}",
                fd = writer.as_raw_fd()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        new_session_on_exec(&mut cmd);
        die_with_parent_on_exec(&mut cmd, libc::SIGTERM);
        keep_fd_on_exec(&mut cmd, writer.as_raw_fd());
        let mut child = cmd.spawn().unwrap();
        drop(writer);
        drop(cmd);
        let text = std::io::read_to_string(reader).unwrap();
        assert!(child.wait().unwrap().success());
        let words: Vec<&str> = text.split_whitespace().collect();
        // A session leader's session id is its pid.
        assert_eq!(words.len(), 2, "{text:?}");
        assert_eq!(words[0], words[1]);
    }

    #[test]
    fn facts() {
        assert!(process_exists(std::process::id() as i32));
        assert!(!process_exists(0));
        assert!(clock_ticks_per_second() >= 1);
        let _ = effective_uid();
        assert!(max_map_count().unwrap() > 0);
    }

    #[test]
    fn the_soft_open_file_limit_rises_to_the_hard_one() {
        let (_, hard) = open_file_limit().unwrap();
        let (before, now) = raise_open_file_limit().unwrap();
        assert!(now >= before);
        let (soft, hard_after) = open_file_limit().unwrap();
        assert_eq!((soft, hard_after), (now, hard));
        // Raised already: nothing changes.
        assert_eq!(raise_open_file_limit().unwrap(), (now, now));
    }
}
