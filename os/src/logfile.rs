//! What the router's and the daemon's logs share to bound what a tenant can make them write:
//! a rate limit on repeated lines and the copy-truncate rotation of a log file. Each log keeps
//! its own line format and wiring (dataplane/src/log.rs, control/src/daemon/log.rs).
//!
//! - [`RateLimiter`]: each key writes at most [`LINES_PER_WINDOW`] lines per [`WINDOW`]; the
//!   rest are counted, and one [`Summary`] (`suppressed N similar line(s) of KEY in S s`) is
//!   owed when the window ends. At most a bound of keys (such as [`MAX_KEYS`]) are tracked;
//!   lines of further keys share one more window, "other keys".
//! - Rotation: a log file larger than [`ROTATE_AT`] bytes is copied to `NAME.1` beside it and
//!   truncated. Writers that append (O_APPEND) go on at the new end; lines written between the
//!   copy and the truncation are lost. `NAME.1` is removed and created anew and exclusively
//!   (O_EXCL), so a symlink planted there is replaced, never written through.
//!   [`rotate_if_larger`] takes the log's path, [`rotate_open_if_larger`] a `/proc/self/fd/N`
//!   link to a log that is open (stderr). [`WriteCounter`] says when to check the size: each
//!   time [`ROTATE_CHECK_EVERY`] more bytes have been written, so a log and its copy hold at most
//!   about 2 x (ROTATE_AT + ROTATE_CHECK_EVERY).
//!
//! Safe code: std has every call these need.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lines one key may write per window; the rest are counted.
pub const LINES_PER_WINDOW: u32 = 20;
/// The rate limit's window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Keys a log's rate limit tracks at most; lines of further keys share one more.
pub const MAX_KEYS: usize = 1024;
/// A log file larger than this is rotated.
pub const ROTATE_AT: u64 = 16 << 20;
/// A log's size is checked each time this many more bytes have been written.
pub const ROTATE_CHECK_EVERY: u64 = 64 << 10;

/// At most `per_window` lines per key per `window`; counts the rest.
pub struct RateLimiter<K> {
    per_window: u32,
    window: Duration,
    max_keys: usize,
    /// The windows of the keys; `None` is the one that keys beyond `max_keys` share.
    keys: BTreeMap<Option<K>, KeyWindow>,
}

struct KeyWindow {
    /// How a summary names the key.
    site: String,
    started: Instant,
    written: u32,
    suppressed: u64,
}

impl KeyWindow {
    /// Starts a new window at `now`; the summary of the one that ended, if it suppressed lines.
    fn restart(&mut self, now: Instant, window: Duration) -> Option<Summary> {
        let summary = (self.suppressed > 0).then(|| Summary {
            site: self.site.clone(),
            suppressed: self.suppressed,
            window,
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

/// How many lines of a key a window suppressed. Displayed as the message of its log line,
/// `suppressed N similar line(s) of SITE in S s`.
#[derive(Debug, PartialEq, Eq)]
pub struct Summary {
    /// How the key is named.
    pub site: String,
    /// Lines not written.
    pub suppressed: u64,
    /// The window's length.
    pub window: Duration,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "suppressed {} similar line(s) of {} in {} s",
            self.suppressed,
            self.site,
            self.window.as_secs()
        )
    }
}

impl<K: Ord> RateLimiter<K> {
    /// A limiter that lets `per_window` lines of each key through per `window`, and tracks at
    /// most `max_keys` keys (lines of further keys share one more window).
    pub const fn new(per_window: u32, window: Duration, max_keys: usize) -> RateLimiter<K> {
        RateLimiter {
            per_window,
            window,
            max_keys,
            keys: BTreeMap::new(),
        }
    }

    /// Whether a line of `key` (called `site()` in its summary) may be written at `now`.
    pub fn check(&mut self, key: K, site: impl FnOnce() -> String, now: Instant) -> Verdict {
        let mut slot = Some(key);
        if !self.keys.contains_key(&slot) && self.keys.len() >= self.max_keys {
            // Forget windows that ended without suppressing anything, to make room.
            let window = self.window;
            self.keys
                .retain(|_, w| w.suppressed > 0 || now.duration_since(w.started) < window);
            if self.keys.len() >= self.max_keys {
                slot = None;
            }
        }
        let entry = self.keys.entry(slot).or_insert_with_key(|slot| KeyWindow {
            site: match slot {
                Some(_) => site(),
                None => "other keys".into(),
            },
            started: now,
            written: 0,
            suppressed: 0,
        });
        let summary = if now.duration_since(entry.started) >= self.window {
            entry.restart(now, self.window)
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

    /// The summaries of windows that ended by `now` having suppressed lines (those windows
    /// restart empty), and how long until the next window that suppressed lines ends (`None`:
    /// nothing is being suppressed).
    pub fn due(&mut self, now: Instant) -> (Vec<Summary>, Option<Duration>) {
        let window = self.window;
        let mut summaries = Vec::new();
        let mut next: Option<Duration> = None;
        for w in self.keys.values_mut().filter(|w| w.suppressed > 0) {
            let ends = w.started + window;
            if ends <= now {
                summaries.extend(w.restart(now, window));
            } else {
                let left = ends - now;
                next = Some(next.map_or(left, |n| n.min(left)));
            }
        }
        (summaries, next)
    }
}

/// Bytes written to a log, to tell when its size is to be checked.
#[derive(Debug, Default)]
pub struct WriteCounter(AtomicU64);

impl WriteCounter {
    /// Nothing written yet.
    pub const fn new() -> WriteCounter {
        WriteCounter(AtomicU64::new(0))
    }

    /// Counts `len` more bytes written; whether the log's size is due to be checked (once per
    /// [`ROTATE_CHECK_EVERY`] bytes).
    pub fn wrote(&self, len: u64) -> bool {
        let before = self.0.fetch_add(len, Ordering::Relaxed);
        before / ROTATE_CHECK_EVERY != (before + len) / ROTATE_CHECK_EVERY
    }
}

/// If `path` is a regular file (not a symlink) larger than `limit` bytes, copies it to `NAME.1`
/// beside it and truncates it; returns the copy's path.
pub fn rotate_if_larger(path: &Path, limit: u64) -> io::Result<Option<PathBuf>> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_file() || meta.len() <= limit {
        return Ok(None);
    }
    copy_truncate(path, path, &meta).map(Some)
}

/// If the file `link` (a `/proc/self/fd/N` link) refers to is a regular file larger than
/// `limit` bytes, copies it to `NAME.1` beside it and truncates it; returns the copy's path.
/// A file deleted (or replaced) under its writer has no place for a copy: it is only
/// truncated, and `None` returned.
pub fn rotate_open_if_larger(link: &Path, limit: u64) -> io::Result<Option<PathBuf>> {
    let meta = fs::metadata(link)?;
    if !meta.is_file() || meta.len() <= limit {
        return Ok(None);
    }
    let path = fs::read_link(link)?;
    let same = fs::metadata(&path).is_ok_and(|m| (m.dev(), m.ino()) == (meta.dev(), meta.ino()));
    if !same {
        OpenOptions::new().write(true).open(link)?.set_len(0)?;
        return Ok(None);
    }
    copy_truncate(link, &path, &meta).map(Some)
}

/// Copies the file opened through `source` (named `path`, described by `meta`) to `NAME.1`
/// beside `path`, created anew and exclusively, and truncates it; returns the copy's path.
fn copy_truncate(source: &Path, path: &Path, meta: &Metadata) -> io::Result<PathBuf> {
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
    io::copy(&mut fs::File::open(source)?, &mut out)?;
    OpenOptions::new().write(true).open(source)?.set_len(0)?;
    Ok(copy)
}

#[cfg(test)]
mod tests;
