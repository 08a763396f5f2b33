//! Ctrl-C: SIGINT, SIGTERM and SIGHUP are blocked and read from a signalfd, so that they end
//! the demo at the next step instead of killing it with everything in place.

use std::cell::Cell;
use std::os::fd::AsFd;
use std::time::Duration;

use super::error::{io_err, DemoError};
use crate::os;

/// The termination signals, blocked and readable from a signalfd; remembers the first one.
pub(super) struct Interrupt {
    signals: os::SignalFd,
    received: Cell<Option<i32>>,
}

impl Interrupt {
    /// Blocks SIGINT, SIGTERM and SIGHUP. Called before the demo starts any thread, so no thread
    /// can take one with the default action; children get an empty mask again (std resets it).
    pub(super) fn install() -> Result<Interrupt, DemoError> {
        Ok(Interrupt {
            signals: os::SignalFd::block(&os::TERMINATION_SIGNALS)
                .map_err(io_err("cannot block SIGINT/SIGTERM/SIGHUP"))?,
            received: Cell::new(None),
        })
    }

    /// Waits up to `timeout` for a signal; returns one that arrived during this call.
    pub(super) fn poll(&self, timeout: Duration) -> Result<Option<i32>, DemoError> {
        let ready = os::poll_readable(&[self.signals.as_fd()], timeout)
            .map_err(io_err("waiting for signals"))?;
        if !ready[0] {
            return Ok(None);
        }
        let first = self
            .signals
            .drain()
            .map_err(io_err("reading the signalfd"))?
            .first()
            .copied();
        if self.received.get().is_none() {
            self.received.set(first);
        }
        Ok(first)
    }

    /// `Err(Interrupted)` once a signal has arrived, now or earlier.
    pub(super) fn check(&self) -> Result<(), DemoError> {
        self.poll(Duration::ZERO)?;
        match self.received.get() {
            Some(sig) => Err(DemoError::Interrupted(sig)),
            None => Ok(()),
        }
    }

    pub(super) fn interrupted(&self) -> bool {
        self.check().is_err()
    }
}
