//! Ctrl-C for experiments that build things on the machine (namespaces, daemons, servers).
//!
//! Killed by SIGINT's default action, `freeflow-bench tcp` would leave its simulated cluster,
//! its daemons and its servers behind. Instead the termination signals are blocked and collected
//! with `sigtimedwait` while the experiment waits for its children, so it stops at the next step
//! and its `Drop`-based teardown runs. SIGCHLD is blocked and collected too: it is what wakes the
//! wait when a child exits, so waiting costs no polling.

use std::cell::Cell;
use std::io;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// The signals that stop an experiment.
const TERMINATION: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The blocked signal set and the first termination signal seen (sticky: once interrupted, every
/// later check says so, so no step starts after it).
pub struct Interrupts {
    set: libc::sigset_t,
    received: Cell<Option<i32>>,
}

impl Interrupts {
    /// Blocks SIGINT, SIGTERM, SIGHUP and SIGCHLD in the calling thread. Call it while the
    /// process has no other thread (a thread that does not block them would take them with the
    /// default action). Children started with `Command` get an empty mask again (std resets it
    /// before exec), so a terminal's Ctrl-C still stops them.
    pub fn block() -> Result<Interrupts, String> {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset initialises the set it is pointed at and cannot fail.
        unsafe { libc::sigemptyset(set.as_mut_ptr()) };
        // SAFETY: initialised by sigemptyset just above.
        let mut set = unsafe { set.assume_init() };
        for sig in TERMINATION.into_iter().chain([libc::SIGCHLD]) {
            // SAFETY: `set` is an initialised sigset and `sig` a valid signal number.
            unsafe { libc::sigaddset(&mut set, sig) };
        }
        // SAFETY: `set` is a valid sigset; the old mask is not asked for (null).
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(format!(
                "blocking signals: {}",
                io::Error::from_raw_os_error(rc)
            ));
        }
        Ok(Interrupts {
            set,
            received: Cell::new(None),
        })
    }

    /// Takes the signals that arrived, waiting up to `timeout` for one; returns the first
    /// termination signal seen so far. A SIGCHLD only ends the wait early.
    pub fn wait(&self, timeout: Duration) -> Option<i32> {
        let mut timeout = libc::timespec {
            tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        loop {
            // SAFETY: `set` is a valid sigset, a null siginfo pointer is allowed (no details
            // wanted) and `timeout` is a valid timespec for the duration of the call.
            let sig = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &timeout) };
            if sig < 0 {
                // EAGAIN (timed out) or EINTR: nothing (more) to take.
                break;
            }
            if TERMINATION.contains(&sig) && self.received.get().is_none() {
                self.received.set(Some(sig));
            }
            // Take whatever else is pending without waiting again.
            timeout = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
        }
        self.received.get()
    }

    /// `Err` naming the signal once a termination signal has arrived.
    pub fn check(&self) -> Result<(), String> {
        match self.wait(Duration::ZERO) {
            None => Ok(()),
            Some(sig) => Err(interrupted(sig)),
        }
    }

    /// Sleeps for `duration` unless a termination signal arrives first (then `Err`).
    pub fn sleep(&self, duration: Duration) -> Result<(), String> {
        let deadline = Instant::now() + duration;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(sig) = self.wait(left) {
                return Err(interrupted(sig));
            }
            if left.is_zero() {
                return Ok(());
            }
        }
    }

    /// Waits for `child` to exit; on a termination signal kills it (SIGKILL: our children hold
    /// nothing that their own exit would release better) and returns `Err`.
    pub fn wait_child(&self, child: &mut Child) -> Result<ExitStatus, String> {
        loop {
            if let Some(status) = child.try_wait().map_err(|e| format!("wait: {e}"))? {
                return Ok(status);
            }
            // SIGCHLD ends this wait when the child exits; the timeout only bounds the cost of
            // a SIGCHLD taken by an earlier wait for another child.
            if let Some(sig) = self.wait(Duration::from_millis(200)) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(interrupted(sig));
            }
        }
    }
}

fn interrupted(sig: i32) -> String {
    let name = match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    };
    format!("interrupted by {name}")
}

#[cfg(test)]
mod tests {
    use super::interrupted;

    #[test]
    fn names() {
        assert_eq!(interrupted(libc::SIGINT), "interrupted by SIGINT");
        assert_eq!(interrupted(libc::SIGTERM), "interrupted by SIGTERM");
    }
}
