//! The router's log: records of the `log` facade (`log::info!`, `warn!`, `error!`) written to
//! stderr, one line each, as
//!
//! ```text
//! 2026-12-03T07:30:27.123Z freeflow-router[4242] WARN shard 0: io_uring submit: ...
//! ```
//!
//! that is an RFC 3339 UTC timestamp with milliseconds, `freeflow-router[PID]`, the level
//! (`ERROR`, `WARN` or `INFO`) and the message. The timestamp has the form of the daemon's
//! lines in `freeflow.log` (`... freeflow[PID]: ...`), so `router.log` (the router's stderr,
//! see `control/src/config.rs`) can be merged with it by time; the daemon finds the router's
//! last words by the `freeflow-router` on each line.
//!
//! Levels: `error` when the router cannot start or has to stop, `warn` when something failed
//! and the router goes on without it, `info` for what happens in its life (serving, attach and
//! detach, stopping). Everything at `info` and above is written: the router has no quieter or
//! chattier mode.
//!
//! What a container can make the router say is bounded, by the mechanism the daemon's log
//! shares (`freeflow_os::logfile`):
//! - Rate limit: each key (a call site, or the `target` a call names, such as "refused SOURCE
//!   REASON" for refused attaches) writes at most [`LINES_PER_WINDOW`] lines per [`WINDOW`];
//!   the rest are counted, and one line `suppressed N similar line(s) of KEY` follows when the
//!   window ends (from [`tick`], which the control thread calls every turn, or from the key's
//!   next line). `ERROR` lines are never suppressed.
//! - Rotation: when stderr is a regular file (the daemon's `router.log`, opened O_APPEND) of
//!   more than [`ROTATE_AT`] bytes, the router copies it to `router.log.1` beside it and
//!   truncates it (copy-truncate: appending writers go on at the new end; lines written
//!   between the copy and the truncation are lost). The size is checked at start and every
//!   [`ROTATE_CHECK_EVERY`](freeflow_os::logfile::ROTATE_CHECK_EVERY) bytes written, so the log
//!   and its copy hold at most about 2 x (ROTATE_AT + ROTATE_CHECK_EVERY).

use freeflow_os::logfile::{
    rotate_open_if_larger, RateLimiter, Verdict, WriteCounter, LINES_PER_WINDOW, MAX_KEYS,
    ROTATE_AT, WINDOW,
};
use log::{Level, LevelFilter, Log, Metadata, Record};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// The most detailed level written.
const MAX_LEVEL: LevelFilter = LevelFilter::Info;
/// The router's stderr, as the kernel names it (a link to the file's path).
const STDERR_LINK: &str = "/proc/self/fd/2";

static LOGGER: OnceLock<RouterLogger> = OnceLock::new();

/// Sends the `log` facade's records to stderr. Call once, first thing in `main`; a second call
/// changes nothing. Rotates an oversized log left from earlier runs.
pub fn init() {
    let logger = LOGGER.get_or_init(|| RouterLogger {
        pid: std::process::id(),
        limiter: Mutex::new(RateLimiter::new(LINES_PER_WINDOW, WINDOW, MAX_KEYS)),
        written: WriteCounter::new(),
        rotating: Mutex::new(()),
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(MAX_LEVEL);
        logger.rotate_if_large();
    }
}

/// Writes the summaries of rate-limit windows that have ended; returns how long until the next
/// one may be due (`None`: nothing is being suppressed). Cheap: one uncontended lock.
pub fn tick() -> Option<Duration> {
    let logger = LOGGER.get()?;
    let now = Instant::now();
    let (summaries, next) = logger.limiter.lock().ok()?.due(now);
    for summary in summaries {
        logger.write(&warn_line(SystemTime::now(), logger.pid, &summary));
    }
    next
}

struct RouterLogger {
    pid: u32,
    /// Keyed by [`key_of`] a record.
    limiter: Mutex<RateLimiter<u64>>,
    /// Bytes written so far, for the rotation check.
    written: WriteCounter,
    /// Held while rotating, so that one thread rotates at a time.
    rotating: Mutex<()>,
}

impl Log for RouterLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= MAX_LEVEL
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        if record.level() != Level::Error {
            let verdict = match self.limiter.lock() {
                Ok(mut limiter) => {
                    limiter.check(key_of(record), || site_of(record), Instant::now())
                }
                Err(_) => Verdict::default(),
            };
            if let Some(summary) = verdict.summary {
                self.write(&warn_line(SystemTime::now(), self.pid, &summary));
            }
            if verdict.suppressed {
                return;
            }
        }
        self.write(&format_line(
            SystemTime::now(),
            self.pid,
            record.level(),
            record.args(),
        ));
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

impl RouterLogger {
    fn write(&self, line: &str) {
        // One write per line, so that the lines of different threads do not mix.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
        if self.written.wrote(line.len() as u64) {
            self.rotate_if_large();
        }
    }

    fn rotate_if_large(&self) {
        // Another thread rotating now is as good.
        let Ok(_rotating) = self.rotating.try_lock() else {
            return;
        };
        let note = match rotate_open_if_larger(Path::new(STDERR_LINK), ROTATE_AT) {
            Ok(None) => return,
            Ok(Some(copy)) => format!("log rotated: earlier lines are in {}", copy.display()),
            Err(e) => format!("cannot rotate the log: {e}"),
        };
        let line = warn_line(SystemTime::now(), self.pid, &note);
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

/// The rate limit's key of a record: its target and call site.
fn key_of(record: &Record) -> u64 {
    let mut hasher = rustc_hash::FxHasher::default();
    (record.target(), record.file(), record.line()).hash(&mut hasher);
    hasher.finish()
}

/// How a summary names a key: the target a call named, else its call site.
fn site_of(record: &Record) -> String {
    if Some(record.target()) != record.module_path() {
        return record.target().to_string();
    }
    format!(
        "{}:{}",
        record.file().unwrap_or("?"),
        record.line().unwrap_or(0)
    )
}

/// One log line, with its newline.
fn format_line(now: SystemTime, pid: u32, level: Level, message: &fmt::Arguments) -> String {
    format!(
        "{} freeflow-router[{pid}] {level} {message}\n",
        humantime::format_rfc3339_millis(now)
    )
}

/// One `WARN` line of the logger's own (a rate-limit summary, a rotation note).
fn warn_line(now: SystemTime, pid: u32, message: &dyn fmt::Display) -> String {
    format_line(now, pid, Level::Warn, &format_args!("{message}"))
}

#[cfg(test)]
mod tests;
