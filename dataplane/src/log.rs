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

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::fmt;
use std::io::Write;
use std::time::SystemTime;

/// The most detailed level written.
const MAX_LEVEL: LevelFilter = LevelFilter::Info;

/// Sends the `log` facade's records to stderr. Call once, first thing in `main`; a second call
/// changes nothing.
pub fn init() {
    let logger = StderrLogger {
        pid: std::process::id(),
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(MAX_LEVEL);
    }
}

struct StderrLogger {
    pid: u32,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= MAX_LEVEL
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format_line(SystemTime::now(), self.pid, record.level(), record.args());
        // One write per line, so that the lines of different threads do not mix.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// One log line, with its newline.
fn format_line(now: SystemTime, pid: u32, level: Level, message: &fmt::Arguments) -> String {
    format!(
        "{} freeflow-router[{pid}] {level} {message}\n",
        humantime::format_rfc3339_millis(now)
    )
}

#[cfg(test)]
mod tests {
    use super::format_line;
    use log::Level;
    use std::time::{Duration, SystemTime};

    #[test]
    fn a_line_has_a_utc_millisecond_timestamp_the_pid_and_the_level() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_747_027_123);
        let line = format_line(at, 4242, Level::Warn, &format_args!("shard {}: stuck", 0));
        assert_eq!(
            line,
            "2025-12-03T07:30:27.123Z freeflow-router[4242] WARN shard 0: stuck\n"
        );
    }
}
