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
//! What a container can make the router say is bounded:
//! - Rate limit: each key (a call site, or the `target` a call names, such as "refused SOURCE
//!   REASON" for refused attaches) writes at most [`LINES_PER_WINDOW`] lines per [`WINDOW`];
//!   the rest are counted, and one line `suppressed N similar line(s) of KEY` follows when the
//!   window ends (from [`tick`], which the control thread calls every turn, or from the key's
//!   next line). `ERROR` lines are never suppressed.
//! - Rotation: when stderr is a regular file (the daemon's `router.log`, opened O_APPEND) of
//!   more than [`ROTATE_AT`] bytes, the router copies it to `router.log.1` beside it and
//!   truncates it (copy-truncate: appending writers go on at the new end; lines written
//!   between the copy and the truncation are lost). The size is checked at start and every
//!   [`ROTATE_CHECK_EVERY`] bytes written, so the log and its copy hold at most about
//!   2 x (ROTATE_AT + ROTATE_CHECK_EVERY).

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::collections::HashMap;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// The most detailed level written.
const MAX_LEVEL: LevelFilter = LevelFilter::Info;
/// Lines one key may write per window; the rest are counted.
pub const LINES_PER_WINDOW: u32 = 20;
/// The rate limit's window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Keys the rate limit tracks at most; lines of further keys share one more.
const MAX_KEYS: usize = 1024;
/// A log on a regular file larger than this is rotated.
pub const ROTATE_AT: u64 = 16 << 20;
/// The log's size is checked each time this many more bytes have been written.
pub const ROTATE_CHECK_EVERY: u64 = 64 << 10;
/// The router's stderr, as the kernel names it (a link to the file's path).
const STDERR_LINK: &str = "/proc/self/fd/2";

static LOGGER: OnceLock<RouterLogger> = OnceLock::new();

/// Sends the `log` facade's records to stderr. Call once, first thing in `main`; a second call
/// changes nothing. Rotates an oversized log left from earlier runs.
pub fn init() {
    let logger = LOGGER.get_or_init(|| RouterLogger {
        pid: std::process::id(),
        limiter: Mutex::new(RateLimiter::new(LINES_PER_WINDOW, WINDOW)),
        written: AtomicU64::new(0),
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
        logger.write(&summary.line(SystemTime::now(), logger.pid));
    }
    next
}

struct RouterLogger {
    pid: u32,
    limiter: Mutex<RateLimiter>,
    /// Bytes written so far, for the rotation check.
    written: AtomicU64,
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
                self.write(&summary.line(SystemTime::now(), self.pid));
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
        let len = line.len() as u64;
        let before = self.written.fetch_add(len, Ordering::Relaxed);
        if before / ROTATE_CHECK_EVERY != (before + len) / ROTATE_CHECK_EVERY {
            self.rotate_if_large();
        }
    }

    fn rotate_if_large(&self) {
        // Another thread rotating now is as good.
        let Ok(_rotating) = self.rotating.try_lock() else {
            return;
        };
        let note = match rotate(Path::new(STDERR_LINK), ROTATE_AT) {
            Ok(None) => return,
            Ok(Some(copy)) => format!("log rotated: earlier lines are in {}", copy.display()),
            Err(e) => format!("cannot rotate the log: {e}"),
        };
        let line = format_line(
            SystemTime::now(),
            self.pid,
            Level::Warn,
            &format_args!("{note}"),
        );
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

/// At most `per_window` lines per key per `window`; counts the rest.
pub struct RateLimiter {
    per_window: u32,
    window: Duration,
    keys: HashMap<u64, KeyWindow>,
}

struct KeyWindow {
    site: String,
    started: Instant,
    written: u32,
    suppressed: u64,
}

impl KeyWindow {
    /// Starts a new window at `now`; the summary of the one that ended, if it suppressed lines.
    fn restart(&mut self, now: Instant) -> Option<Summary> {
        let summary = (self.suppressed > 0).then(|| Summary {
            site: self.site.clone(),
            suppressed: self.suppressed,
        });
        (self.started, self.written, self.suppressed) = (now, 0, 0);
        summary
    }
}

/// What to do with one line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Count it instead of writing it.
    pub suppressed: bool,
    /// The summary of the key's last window, to write first.
    pub summary: Option<Summary>,
}

/// How many lines of a key a window suppressed.
#[derive(Debug, PartialEq, Eq)]
pub struct Summary {
    pub site: String,
    pub suppressed: u64,
}

impl Summary {
    fn line(&self, now: SystemTime, pid: u32) -> String {
        let (n, site) = (self.suppressed, &self.site);
        let secs = WINDOW.as_secs();
        let message = format_args!("suppressed {n} similar line(s) of {site} in {secs} s");
        format_line(now, pid, Level::Warn, &message)
    }
}

/// The key that lines of keys beyond [`MAX_KEYS`] share.
const OVERFLOW_KEY: u64 = u64::MAX;

impl RateLimiter {
    pub fn new(per_window: u32, window: Duration) -> RateLimiter {
        RateLimiter {
            per_window,
            window,
            keys: HashMap::new(),
        }
    }

    /// Whether a line of `key` (called `site()` in its summary) may be written at `now`.
    pub fn check(&mut self, key: u64, site: impl FnOnce() -> String, now: Instant) -> Verdict {
        let mut key = key;
        if !self.keys.contains_key(&key) && self.keys.len() >= MAX_KEYS {
            let window = self.window;
            self.keys
                .retain(|_, w| w.suppressed > 0 || now.duration_since(w.started) < window);
            if self.keys.len() >= MAX_KEYS {
                key = OVERFLOW_KEY;
            }
        }
        let entry = self.keys.entry(key).or_insert_with(|| KeyWindow {
            site: if key == OVERFLOW_KEY {
                "other keys".into()
            } else {
                site()
            },
            started: now,
            written: 0,
            suppressed: 0,
        });
        let summary = if now.duration_since(entry.started) >= self.window {
            entry.restart(now)
        } else {
            None
        };
        let suppressed = entry.written >= self.per_window;
        if suppressed {
            entry.suppressed += 1;
        } else {
            entry.written += 1;
        }
        Verdict {
            suppressed,
            summary,
        }
    }

    /// The summaries of windows that ended at `now` having suppressed lines (those windows
    /// restart), and how long until the next window that suppressed lines ends.
    pub fn due(&mut self, now: Instant) -> (Vec<Summary>, Option<Duration>) {
        let mut summaries = Vec::new();
        let mut next: Option<Duration> = None;
        for w in self.keys.values_mut().filter(|w| w.suppressed > 0) {
            let ends = w.started + self.window;
            if ends <= now {
                summaries.extend(w.restart(now));
            } else {
                let left = ends - now;
                next = Some(next.map_or(left, |n| n.min(left)));
            }
        }
        (summaries, next)
    }
}

/// If the file `link` (a `/proc/self/fd/N` link) refers to is a regular file larger than
/// `limit` bytes, copies it to `NAME.1` beside it and truncates it; returns the copy's path.
/// Writers that append (O_APPEND) go on at the new end. A `NAME.1` left there is replaced, not
/// written through: it is removed and created anew (O_EXCL), so a link there is not followed.
pub fn rotate(link: &Path, limit: u64) -> io::Result<Option<PathBuf>> {
    let meta = fs::metadata(link)?;
    if !meta.is_file() || meta.len() <= limit {
        return Ok(None);
    }
    let path = fs::read_link(link)?;
    // A log deleted (or replaced) under us has no place for a copy: just bound it.
    let same = fs::metadata(&path).is_ok_and(|m| (m.dev(), m.ino()) == (meta.dev(), meta.ino()));
    if !same {
        OpenOptions::new().write(true).open(link)?.set_len(0)?;
        return Ok(None);
    }
    let mut name = path
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{} has no file name", path.display())))?
        .to_owned();
    name.push(".1");
    let copy = path.with_file_name(name);
    match fs::remove_file(&copy) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&copy)?;
    out.set_permissions(meta.permissions())?;
    io::copy(&mut fs::File::open(link)?, &mut out)?;
    OpenOptions::new().write(true).open(link)?.set_len(0)?;
    Ok(Some(copy))
}

#[cfg(test)]
mod tests;
