//! The daemon's log: one line per event on stderr (`freeflow.log` in the state directory when
//! the daemon runs in the background), as
//!
//! ```text
//! 2026-12-03T07:30:27.123Z freeflow[4242]: router table: 3 container(s), ...
//! ```
//!
//! What a tenant can make the daemon say is bounded, with the router's policy and mechanism
//! (`freeflow_os::logfile`, shared with dataplane/src/log.rs):
//! - Rate limit: lines of one [`Key`] (registry errors, skipped containers, failed pushes, router
//!   restarts) are written at most [`LINES_PER_WINDOW`] per [`WINDOW`]; the rest are counted,
//!   and one line `suppressed N similar line(s) of KEY` follows when the window ends (from
//!   [`tick`], which the daemon's loop calls every turn, or from the key's next line). Lines of
//!   the daemon's own life ([`log`]: start, ready, stop, fatal errors) are never suppressed.
//! - Rotation: when stderr is the daemon's log file and it grows past [`ROTATE_AT`] bytes, it is
//!   copied to `freeflow.log.1` beside it and truncated (copy-truncate: the daemon and `up`
//!   append, so they go on at the new end). The size is checked at start and every
//!   [`ROTATE_CHECK_EVERY`](freeflow_os::logfile::ROTATE_CHECK_EVERY) bytes written.
//!   `freeflow.log.1` is created anew and exclusively (O_EXCL), so a symlink planted there is
//!   replaced, never written through.

use std::fmt::Display;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use freeflow_os::logfile::{
    rotate_if_larger, RateLimiter, WriteCounter, LINES_PER_WINDOW, ROTATE_AT, WINDOW,
};

use crate::supervise::{format_unix_ms, unix_ms_now};

/// This process's stderr, as the kernel names it (a link to the file's path).
const STDERR_LINK: &str = "/proc/self/fd/2";

/// The kinds of lines a tenant (through the registry or its containers) can make repeat.
pub type Key = &'static str;
/// The registry cannot be read or is corrupt.
pub const KEY_REGISTRY: Key = "registry errors";
/// A container starts or stops being left out of the table.
pub const KEY_SKIPPED: Key = "skipped containers";
/// The table push failed.
pub const KEY_PUSH: Key = "failed pushes";
/// The router died, was restarted, or failed to start.
pub const KEY_RESTART: Key = "router restarts";
/// What the Docker watcher says: registrations, skipped containers, engine errors.
pub const KEY_DOCKER: Key = "docker watcher lines";
/// The keys above, and room to spare: the bound is never reached.
const MAX_KEYS: usize = 16;

struct DaemonLog {
    limiter: RateLimiter<Key>,
    /// Bytes written so far, for the rotation check.
    written: WriteCounter,
    /// The log file stderr is, if it is the daemon's own log (then it is rotated).
    rotating: Option<PathBuf>,
}

static LOG: Mutex<DaemonLog> = Mutex::new(DaemonLog {
    limiter: RateLimiter::new(LINES_PER_WINDOW, WINDOW, MAX_KEYS),
    written: WriteCounter::new(),
    rotating: None,
});

/// Rotates stderr from now on when it is the file `path` (the daemon's `freeflow.log`), and
/// rotates it now if it is already too large.
pub fn init(path: &Path) {
    let same = fs::metadata(STDERR_LINK)
        .ok()
        .zip(fs::metadata(path).ok())
        .is_some_and(|(a, b)| a.is_file() && (a.dev(), a.ino()) == (b.dev(), b.ino()));
    if let Ok(mut state) = LOG.lock() {
        state.rotating = same.then(|| path.to_path_buf());
        state.rotate_if_large();
    }
}

/// One line of the daemon's own life, never suppressed.
pub fn log(message: impl Display) {
    if let Ok(state) = LOG.lock() {
        state.write(&format_line(&message));
    } else {
        let _ = io::stderr().write_all(format_line(&message).as_bytes());
    }
}

/// One line of kind `key`, rate-limited (see the module docs).
pub fn log_limited(key: Key, message: impl Display) {
    let Ok(mut state) = LOG.lock() else {
        return;
    };
    let verdict = state.limiter.check(key, || key.to_string(), Instant::now());
    if let Some(summary) = verdict.summary {
        state.write(&format_line(&summary));
    }
    if !verdict.suppressed {
        state.write(&format_line(&message));
    }
}

/// Writes the summaries of windows that have ended.
pub fn tick() {
    let Ok(mut state) = LOG.lock() else {
        return;
    };
    let (summaries, _) = state.limiter.due(Instant::now());
    for summary in summaries {
        state.write(&format_line(&summary));
    }
}

fn format_line(message: &dyn Display) -> String {
    format!(
        "{} freeflow[{}]: {message}\n",
        format_unix_ms(unix_ms_now()),
        std::process::id()
    )
}

impl DaemonLog {
    fn write(&self, line: &str) {
        let _ = io::stderr().lock().write_all(line.as_bytes());
        if self.written.wrote(line.len() as u64) {
            self.rotate_if_large();
        }
    }

    fn rotate_if_large(&self) {
        let Some(path) = &self.rotating else {
            return;
        };
        let note = match rotate_if_larger(path, ROTATE_AT) {
            Ok(None) => return,
            Ok(Some(copy)) => format!("log rotated: earlier lines are in {}", copy.display()),
            Err(e) => format!("cannot rotate the log {}: {e}", path.display()),
        };
        let _ = io::stderr().write_all(format_line(&note).as_bytes());
    }
}
