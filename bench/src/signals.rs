//! Ctrl-C for experiments that build things on the machine (namespaces, daemons, servers).
//!
//! Killed by SIGINT's default action, `freeflow-bench tcp` would leave its simulated cluster,
//! its daemons and its servers behind. Instead the termination signals are blocked and read from
//! a signalfd (`freeflow-os`) while the experiment waits for its children, so it stops at the
//! next step and its `Drop`-based teardown runs. SIGCHLD is blocked and read too: it is what wakes
//! the wait when a child exits, so waiting costs no polling. The children are run with
//! `freeflow_os::child`, with [`Interrupts`] as the watcher that kills them on a signal.

use std::cell::Cell;
use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use freeflow_os::child::{Stop, Watcher};
use freeflow_os::poll::poll_readable;
use freeflow_os::signals::{SignalFd, TERMINATION_SIGNALS};

/// The blocked signals and the first termination signal seen (sticky: once interrupted, every
/// later check says so, so no step starts after it).
pub struct Interrupts {
    signals: SignalFd,
    received: Cell<Option<i32>>,
}

impl Interrupts {
    /// Blocks SIGINT, SIGTERM, SIGHUP and SIGCHLD in the calling thread. Call it while the
    /// process has no other thread (a thread that does not block them would take them with the
    /// default action). Children started with `Command` get an empty mask again (std resets it
    /// before exec), so a terminal's Ctrl-C still stops them.
    pub fn block() -> Result<Interrupts, String> {
        let mut blocked = TERMINATION_SIGNALS.to_vec();
        blocked.push(libc::SIGCHLD);
        let signals = SignalFd::block(&blocked).map_err(|e| format!("blocking signals: {e}"))?;
        Ok(Interrupts {
            signals,
            received: Cell::new(None),
        })
    }

    /// Takes the signals that arrived, waiting up to `timeout` for one; returns the first
    /// termination signal seen so far. A SIGCHLD only ends the wait early.
    pub fn wait(&self, timeout: Duration) -> Option<i32> {
        // An error (none is expected of a valid signalfd) counts as nothing to take.
        let ready = poll_readable(&[self.signals.as_fd()], timeout).is_ok_and(|r| r[0]);
        let arrived = if ready {
            self.signals.drain().unwrap_or_default()
        } else {
            Vec::new()
        };
        let first = arrived
            .into_iter()
            .find(|sig| TERMINATION_SIGNALS.contains(sig));
        if self.received.get().is_none() {
            self.received.set(first);
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
}

/// An experiment's child run with `freeflow_os::child` is killed on a termination signal
/// (SIGKILL: our children hold nothing that their own exit would release better). SIGCHLD ends
/// the wait when the child exits; the pause ([`CHILD_PAUSE`]) only bounds the cost of a SIGCHLD
/// taken by an earlier wait for another child.
impl Watcher for &Interrupts {
    fn wait(&mut self, pause: Duration) -> io::Result<Option<Stop>> {
        Ok(Interrupts::wait(self, pause).map(Stop::Kill))
    }
}

/// The longest pause between two looks at a running child (see the [`Watcher`] above).
pub const CHILD_PAUSE: Duration = Duration::from_millis(200);

/// The error that says which signal ended the experiment.
pub fn interrupted(sig: i32) -> String {
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
