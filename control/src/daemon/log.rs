//! The daemon's log: one line per event on stderr (`freeflow.log` in the state directory when
//! the daemon runs in the background), as
//!
//! ```text
//! 2026-12-03T07:30:27.123Z freeflow[4242]: router table: 3 container(s), ...
//! ```
//!
//! What a tenant can make the daemon say is bounded, with the router's policy
//! (dataplane/src/log.rs):
//! - Rate limit: lines of one [`Key`] (registry errors, skipped containers, failed pushes, router
//!   restarts) are written at most [`LINES_PER_WINDOW`] per [`WINDOW`]; the rest are counted,
//!   and one line `suppressed N similar line(s) of KEY` follows when the window ends (from
//!   [`tick`], which the daemon's loop calls every turn, or from the key's next line). Lines of
//!   the daemon's own life ([`log`]: start, ready, stop, fatal errors) are never suppressed.
//! - Rotation: when stderr is the daemon's log file and it grows past [`ROTATE_AT`] bytes, it is
//!   copied to `freeflow.log.1` beside it and truncated (copy-truncate: the daemon and `up`
//!   append, so they go on at the new end). The size is checked at start and every
//!   [`ROTATE_CHECK_EVERY`] bytes written. `freeflow.log.1` is created anew and exclusively
//!   (O_EXCL), so a symlink planted there is replaced, never written through.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::supervise::{format_unix_ms, unix_ms_now};

/// Lines one key may write per window; the rest are counted.
pub const LINES_PER_WINDOW: u32 = 20;
/// The rate limit's window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// A log file larger than this is rotated.
pub const ROTATE_AT: u64 = 16 << 20;
/// The log's size is checked each time this many more bytes have been written.
pub const ROTATE_CHECK_EVERY: u64 = 64 << 10;
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

struct DaemonLog {
    limiter: RateLimiter,
    /// Bytes written so far, for the rotation check.
    written: u64,
    /// The log file stderr is, if it is the daemon's own log (then it is rotated).
    rotating: Option<PathBuf>,
}

static LOG: Mutex<DaemonLog> = Mutex::new(DaemonLog {
    limiter: RateLimiter::new(LINES_PER_WINDOW, WINDOW),
    written: 0,
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
    if let Ok(mut state) = LOG.lock() {
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
    let verdict = state.limiter.check(key, Instant::now());
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
    for summary in state.limiter.due(Instant::now()) {
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
    fn write(&mut self, line: &str) {
        let _ = io::stderr().lock().write_all(line.as_bytes());
        let len = line.len() as u64;
        let before = self.written;
        self.written += len;
        if before / ROTATE_CHECK_EVERY != self.written / ROTATE_CHECK_EVERY {
            self.rotate_if_large();
        }
    }

    fn rotate_if_large(&mut self) {
        let Some(path) = &self.rotating else {
            return;
        };
        let note = match rotate(path, ROTATE_AT) {
            Ok(None) => return,
            Ok(Some(copy)) => format!("log rotated: earlier lines are in {}", copy.display()),
            Err(e) => format!("cannot rotate the log {}: {e}", path.display()),
        };
        let _ = io::stderr().write_all(format_line(&note).as_bytes());
    }
}

/// If `path` is a regular file larger than `limit` bytes, copies it to `NAME.1` beside it and
/// truncates it; returns the copy's path. A `NAME.1` left there is removed and created anew
/// (O_EXCL), so a symlink there is not followed.
pub fn rotate(path: &Path, limit: u64) -> io::Result<Option<PathBuf>> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_file() || meta.len() <= limit {
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
    io::copy(&mut fs::File::open(path)?, &mut out)?;
    OpenOptions::new().write(true).open(path)?.set_len(0)?;
    Ok(Some(copy))
}

/// At most `per_window` lines per key per `window`; counts the rest.
pub struct RateLimiter {
    per_window: u32,
    window: Duration,
    keys: BTreeMap<Key, KeyWindow>,
}

struct KeyWindow {
    started: Instant,
    written: u32,
    suppressed: u64,
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
    /// The key.
    pub key: Key,
    /// Lines not written.
    pub suppressed: u64,
    /// The window's length.
    pub window: Duration,
}

impl Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "suppressed {} similar line(s) of {} in {} s",
            self.suppressed,
            self.key,
            self.window.as_secs()
        )
    }
}

impl RateLimiter {
    /// A limiter that lets `per_window` lines of each key through per `window`.
    pub const fn new(per_window: u32, window: Duration) -> RateLimiter {
        RateLimiter {
            per_window,
            window,
            keys: BTreeMap::new(),
        }
    }

    /// Whether a line of `key` may be written at `now`.
    pub fn check(&mut self, key: Key, now: Instant) -> Verdict {
        let window = self.window;
        let entry = self.keys.entry(key).or_insert(KeyWindow {
            started: now,
            written: 0,
            suppressed: 0,
        });
        let mut summary = None;
        if now.duration_since(entry.started) >= window {
            summary = (entry.suppressed > 0).then_some(Summary {
                key,
                suppressed: entry.suppressed,
                window,
            });
            (entry.started, entry.written, entry.suppressed) = (now, 0, 0);
        }
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

    /// The summaries of windows that ended by `now` having suppressed lines (those windows
    /// restart empty).
    pub fn due(&mut self, now: Instant) -> Vec<Summary> {
        let window = self.window;
        let mut summaries = Vec::new();
        for (key, w) in self.keys.iter_mut() {
            if w.suppressed > 0 && now.duration_since(w.started) >= window {
                summaries.push(Summary {
                    key,
                    suppressed: w.suppressed,
                    window,
                });
                (w.started, w.written, w.suppressed) = (now, 0, 0);
            }
        }
        summaries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_writes_its_share_then_one_summary() {
        let mut limiter = RateLimiter::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let written: Vec<bool> = (0..10)
            .map(|_| !limiter.check(KEY_SKIPPED, t0).suppressed)
            .collect();
        assert_eq!(written.iter().filter(|w| **w).count(), 3);
        // Another key has its own share.
        assert!(!limiter.check(KEY_REGISTRY, t0).suppressed);
        assert!(limiter.due(t0 + Duration::from_secs(5)).is_empty());
        let due = limiter.due(t0 + Duration::from_secs(10));
        assert_eq!(
            due,
            [Summary {
                key: KEY_SKIPPED,
                suppressed: 7,
                window: Duration::from_secs(10)
            }]
        );
        assert_eq!(
            due[0].to_string(),
            "suppressed 7 similar line(s) of skipped containers in 10 s"
        );
        // The next window starts empty; a summary owed at the key's next line comes with it.
        let t1 = t0 + Duration::from_secs(10);
        for _ in 0..4 {
            limiter.check(KEY_SKIPPED, t1);
        }
        let verdict = limiter.check(KEY_SKIPPED, t1 + Duration::from_secs(11));
        assert!(!verdict.suppressed);
        assert_eq!(verdict.summary.map(|s| s.suppressed), Some(1));
    }

    #[test]
    fn a_large_log_is_copied_and_truncated_without_following_a_planted_link() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("freeflow.log");
        let victim = tmp.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, tmp.path().join("freeflow.log.1")).unwrap();
        fs::write(&log, vec![b'x'; 100]).unwrap();
        assert_eq!(rotate(&log, 100).unwrap(), None, "not past the limit");
        let mut file = OpenOptions::new().append(true).open(&log).unwrap();
        file.write_all(b"y").unwrap();
        let copy = rotate(&log, 100).unwrap().unwrap();
        assert_eq!(copy, tmp.path().join("freeflow.log.1"));
        assert!(fs::symlink_metadata(&copy).unwrap().is_file());
        assert_eq!(fs::read(&copy).unwrap().len(), 101);
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        assert_eq!(fs::metadata(&log).unwrap().len(), 0);
        // An appending writer goes on at the new end.
        file.write_all(b"z").unwrap();
        assert_eq!(fs::read(&log).unwrap(), b"z");
        // A symlink in place of the log itself is not rotated.
        let link = tmp.path().join("linked.log");
        std::os::unix::fs::symlink(&copy, &link).unwrap();
        assert_eq!(rotate(&link, 1).unwrap(), None);
    }
}
