//! Processes: what a child started with `Command` does between fork and exec (each step a
//! `pre_exec` hook; hooks run in the order they were added), facts about processes that std
//! does not tell, and [`Pidfd`]: a process watched (and signalled) by descriptor, also one that
//! is not our child.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

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

/// A process descriptor (pidfd_open(2)): it names one process for as long as it is open (a
/// reused pid does not make it name another), it becomes readable when that process exits, and
/// signals sent through it reach that process or none. It works for any process we may signal,
/// not only our children; but only a parent can reap a child and learn its exit status, so a
/// `Pidfd` tells *that* a process ended, never *how*.
#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
    pid: i32,
}

impl Pidfd {
    /// Opens a descriptor for process `pid` (ESRCH if there is none).
    pub fn open(pid: i32) -> io::Result<Pidfd> {
        if pid <= 0 {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        // SAFETY: pidfd_open takes a pid and a flags word (0) and returns a new descriptor or
        // -1; it touches no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        Ok(Pidfd { fd, pid })
    }

    /// The pid it was opened for.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the process has exited (a zombie that is not reaped yet counts as exited).
    pub fn has_exited(&self) -> io::Result<bool> {
        self.wait_exit(Duration::ZERO)
    }

    /// Waits up to `limit` for the process to exit; whether it has.
    pub fn wait_exit(&self, limit: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ready = crate::poll::poll_readable(&[self.fd.as_fd()], left)?;
            if ready[0] {
                return Ok(true);
            }
            // An interrupted poll reports nothing ready: wait again for what is left.
            if left.is_zero() || Instant::now() >= deadline {
                return Ok(false);
            }
        }
    }

    /// Sends `signal` to the process (pidfd_send_signal(2)); ESRCH once it has exited.
    pub fn send_signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: pidfd_send_signal takes our open pidfd, a signal number, a null siginfo
        // pointer (the kernel then fills in one as kill(2) would) and a flags word (0).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0 as libc::c_uint,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsFd for Pidfd {
    /// Readable once the process has exited: for poll(2) beside other descriptors.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
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

    /// A process that is not our child (a grandchild, its parent gone): its exit is seen
    /// through the pidfd, and a signal through it reaches it.
    #[test]
    fn a_non_child_exiting_is_seen() {
        // `sh` starts `sleep` in the background, prints its pid and exits: `sleep` is then
        // the child of whoever reaps orphans, not ours.
        let out = Command::new("sh")
            .arg("-c")
            .arg("sleep 30 >/dev/null 2>&1 </dev/null & echo $!")
            .stderr(Stdio::null())
            .output()
            .unwrap();
        let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let pidfd = Pidfd::open(pid).unwrap();
        assert_eq!(pidfd.pid(), pid);
        assert!(!pidfd.has_exited().unwrap());
        assert!(!pidfd.wait_exit(Duration::from_millis(50)).unwrap());
        pidfd.send_signal(libc::SIGKILL).unwrap();
        assert!(
            pidfd.wait_exit(Duration::from_secs(10)).unwrap(),
            "exit not seen"
        );
        assert!(pidfd.has_exited().unwrap());
        assert!(Pidfd::open(0).is_err());
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
