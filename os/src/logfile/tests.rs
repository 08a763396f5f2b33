use super::{
    rotate_if_larger, rotate_open_if_larger, RateLimiter, Summary, Verdict, WriteCounter, MAX_KEYS,
    ROTATE_CHECK_EVERY,
};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Keys of the daemon's log, as it names them.
const KEY_SKIPPED: &str = "skipped containers";
const KEY_REGISTRY: &str = "registry errors";

/// How the daemon's keys name themselves in a summary.
fn named(key: &'static str) -> impl FnOnce() -> String {
    move || key.to_string()
}

#[test]
fn each_key_writes_its_share_per_window_then_one_summary() {
    let window = Duration::from_secs(10);
    let mut limiter = RateLimiter::new(3, window, MAX_KEYS);
    let start = Instant::now();
    let site = || "refused net:[1] Busy".to_string();
    let written = |limiter: &mut RateLimiter<u64>, key: u64, at: Instant, n: usize| {
        (0..n)
            .filter(|_| !limiter.check(key, site, at).suppressed)
            .count()
    };
    // A flood from key 1: three lines, the rest counted.
    assert_eq!(written(&mut limiter, 1, start, 1000), 3);
    // Another key is not affected by it.
    assert_eq!(written(&mut limiter, 2, start, 2), 2);
    // Within the window nothing is due; the summary is due when the window ends.
    let (summaries, next) = limiter.due(start + Duration::from_secs(4));
    assert!(summaries.is_empty());
    assert_eq!(next, Some(Duration::from_secs(6)));
    let later = start + window;
    let (summaries, next) = limiter.due(later);
    assert_eq!(
        summaries,
        [Summary {
            site: site(),
            suppressed: 997,
            window,
        }]
    );
    assert_eq!(next, None, "nothing suppressed any more");
    // A new window: three more lines, then the summary comes with the first line after it.
    assert_eq!(written(&mut limiter, 1, later, 5), 3);
    let verdict = limiter.check(1, site, later + window);
    assert_eq!(
        verdict,
        Verdict {
            suppressed: false,
            summary: Some(Summary {
                site: site(),
                suppressed: 2,
                window,
            })
        }
    );
    let line = verdict.summary.unwrap().to_string();
    assert!(
        line.ends_with("suppressed 2 similar line(s) of refused net:[1] Busy in 10 s"),
        "{line}"
    );
}

#[test]
fn each_key_writes_its_share_then_one_summary() {
    let mut limiter = RateLimiter::new(3, Duration::from_secs(10), MAX_KEYS);
    let t0 = Instant::now();
    let written: Vec<bool> = (0..10)
        .map(|_| {
            !limiter
                .check(KEY_SKIPPED, named(KEY_SKIPPED), t0)
                .suppressed
        })
        .collect();
    assert_eq!(written.iter().filter(|w| **w).count(), 3);
    // Another key has its own share.
    assert!(
        !limiter
            .check(KEY_REGISTRY, named(KEY_REGISTRY), t0)
            .suppressed
    );
    assert!(limiter.due(t0 + Duration::from_secs(5)).0.is_empty());
    let (due, _) = limiter.due(t0 + Duration::from_secs(10));
    assert_eq!(
        due,
        [Summary {
            site: KEY_SKIPPED.to_string(),
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
        limiter.check(KEY_SKIPPED, named(KEY_SKIPPED), t1);
    }
    let verdict = limiter.check(
        KEY_SKIPPED,
        named(KEY_SKIPPED),
        t1 + Duration::from_secs(11),
    );
    assert!(!verdict.suppressed);
    assert_eq!(verdict.summary.map(|s| s.suppressed), Some(1));
}

#[test]
fn keys_beyond_the_bound_share_one_window() {
    let mut limiter = RateLimiter::new(1, Duration::from_secs(10), MAX_KEYS);
    let now = Instant::now();
    // Each key writes its one line, and keeps its (running) window.
    for key in 0..MAX_KEYS as u64 {
        assert!(!limiter.check(key, String::new, now).suppressed);
    }
    let extra: Vec<bool> = (0..10u64)
        .map(|k| limiter.check(1 << 40 | k, String::new, now).suppressed)
        .collect();
    assert_eq!(extra.iter().filter(|s| !**s).count(), 1, "{extra:?}");
    assert!(limiter.keys.len() <= MAX_KEYS + 1);
}

#[test]
fn the_size_is_checked_once_per_check_interval_written() {
    let counter = WriteCounter::new();
    assert!(!counter.wrote(ROTATE_CHECK_EVERY - 1));
    assert!(counter.wrote(1));
    assert!(!counter.wrote(ROTATE_CHECK_EVERY - 1));
    assert!(counter.wrote(2 * ROTATE_CHECK_EVERY));
}

/// A fresh directory under the system's temporary directory.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ff-log-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn fd_link(file: &impl AsRawFd) -> PathBuf {
    Path::new("/proc/self/fd").join(file.as_raw_fd().to_string())
}

/// A fresh directory `name` with a `router.log` in it, opened the way the daemon opens
/// router.log: appending. The directory, the log's path and the open log.
fn appending_log(name: &str) -> (PathBuf, PathBuf, fs::File) {
    let dir = temp_dir(name);
    let path = dir.join("router.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    (dir, path, log)
}

#[test]
fn a_log_file_over_the_limit_is_copied_beside_it_and_truncated() {
    let (dir, path, mut log) = appending_log("rotate");
    log.write_all(b"old line 1\nold line 2\n").unwrap();
    // At or under the limit: nothing happens.
    assert_eq!(rotate_open_if_larger(&fd_link(&log), 22).unwrap(), None);
    // A link planted where the copy goes is replaced, not written through.
    let victim = dir.join("victim");
    fs::write(&victim, "untouched").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("router.log.1")).unwrap();

    let copy = rotate_open_if_larger(&fd_link(&log), 10).unwrap();
    assert_eq!(copy, Some(dir.join("router.log.1")));
    assert_eq!(
        fs::read_to_string(dir.join("router.log.1")).unwrap(),
        "old line 1\nold line 2\n"
    );
    assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched");
    assert!(!fs::symlink_metadata(dir.join("router.log.1"))
        .unwrap()
        .file_type()
        .is_symlink());
    // The writer goes on at the new end, without a hole.
    log.write_all(b"new line\n").unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), "new line\n");

    // A second rotation replaces the copy.
    log.write_all(b"more than ten bytes\n").unwrap();
    rotate_open_if_larger(&fd_link(&log), 10).unwrap();
    assert_eq!(
        fs::read_to_string(dir.join("router.log.1")).unwrap(),
        "new line\nmore than ten bytes\n"
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_log_that_is_not_a_regular_file_or_was_deleted_is_handled() {
    let (reader, writer) = std::io::pipe().unwrap();
    assert_eq!(rotate_open_if_larger(&fd_link(&writer), 0).unwrap(), None);
    drop(reader);
    let (dir, path, mut log) = appending_log("deleted");
    log.write_all(b"0123456789").unwrap();
    fs::remove_file(&path).unwrap();
    // No copy beside a deleted file, but it is bounded all the same.
    assert_eq!(rotate_open_if_larger(&fd_link(&log), 5).unwrap(), None);
    assert_eq!(log.metadata().unwrap().len(), 0);
    assert!(fs::read_dir(&dir).unwrap().next().is_none());
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_large_log_is_copied_and_truncated_without_following_a_planted_link() {
    let tmp = temp_dir("planted");
    let log = tmp.join("freeflow.log");
    let victim = tmp.join("victim");
    fs::write(&victim, b"keep").unwrap();
    std::os::unix::fs::symlink(&victim, tmp.join("freeflow.log.1")).unwrap();
    fs::write(&log, vec![b'x'; 100]).unwrap();
    assert_eq!(
        rotate_if_larger(&log, 100).unwrap(),
        None,
        "not past the limit"
    );
    let mut file = OpenOptions::new().append(true).open(&log).unwrap();
    file.write_all(b"y").unwrap();
    let copy = rotate_if_larger(&log, 100).unwrap().unwrap();
    assert_eq!(copy, tmp.join("freeflow.log.1"));
    assert!(fs::symlink_metadata(&copy).unwrap().is_file());
    assert_eq!(fs::read(&copy).unwrap().len(), 101);
    assert_eq!(fs::read(&victim).unwrap(), b"keep");
    assert_eq!(fs::metadata(&log).unwrap().len(), 0);
    // An appending writer goes on at the new end.
    file.write_all(b"z").unwrap();
    assert_eq!(fs::read(&log).unwrap(), b"z");
    // A symlink in place of the log itself is not rotated.
    let link = tmp.join("linked.log");
    std::os::unix::fs::symlink(&copy, &link).unwrap();
    assert_eq!(rotate_if_larger(&link, 1).unwrap(), None);
    let _ = fs::remove_dir_all(&tmp);
}
