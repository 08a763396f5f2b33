use super::{format_line, rotate, RateLimiter, Summary, Verdict};
use log::Level;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

#[test]
fn a_line_has_a_utc_millisecond_timestamp_the_pid_and_the_level() {
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_747_027_123);
    let line = format_line(at, 4242, Level::Warn, &format_args!("shard {}: stuck", 0));
    assert_eq!(
        line,
        "2025-12-03T07:30:27.123Z freeflow-router[4242] WARN shard 0: stuck\n"
    );
}

#[test]
fn each_key_writes_its_share_per_window_then_one_summary() {
    let window = Duration::from_secs(10);
    let mut limiter = RateLimiter::new(3, window);
    let start = Instant::now();
    let site = || "refused net:[1] Busy".to_string();
    let written = |limiter: &mut RateLimiter, key: u64, at: Instant, n: usize| {
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
            suppressed: 997
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
                suppressed: 2
            })
        }
    );
    let line = verdict.summary.unwrap().line(SystemTime::UNIX_EPOCH, 7);
    assert!(
        line.ends_with("WARN suppressed 2 similar line(s) of refused net:[1] Busy in 10 s\n"),
        "{line}"
    );
}

#[test]
fn keys_beyond_the_bound_share_one_window() {
    let mut limiter = RateLimiter::new(1, Duration::from_secs(10));
    let now = Instant::now();
    // Each key writes its one line, and keeps its (running) window.
    for key in 0..super::MAX_KEYS as u64 {
        assert!(!limiter.check(key, String::new, now).suppressed);
    }
    let extra: Vec<bool> = (0..10u64)
        .map(|k| limiter.check(1 << 40 | k, String::new, now).suppressed)
        .collect();
    assert_eq!(extra.iter().filter(|s| !**s).count(), 1, "{extra:?}");
    assert!(limiter.keys.len() <= super::MAX_KEYS + 1);
}

/// A fresh directory under the system's temporary directory.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ff-log-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fd_link(file: &std::fs::File) -> PathBuf {
    Path::new("/proc/self/fd").join(file.as_raw_fd().to_string())
}

#[test]
fn a_log_file_over_the_limit_is_copied_beside_it_and_truncated() {
    let dir = temp_dir("rotate");
    let path = dir.join("router.log");
    // Opened the way the daemon opens router.log: appending.
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    log.write_all(b"old line 1\nold line 2\n").unwrap();
    // At or under the limit: nothing happens.
    assert_eq!(rotate(&fd_link(&log), 22).unwrap(), None);
    // A link planted where the copy goes is replaced, not written through.
    let victim = dir.join("victim");
    std::fs::write(&victim, "untouched").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("router.log.1")).unwrap();

    let copy = rotate(&fd_link(&log), 10).unwrap();
    assert_eq!(copy, Some(dir.join("router.log.1")));
    assert_eq!(
        std::fs::read_to_string(dir.join("router.log.1")).unwrap(),
        "old line 1\nold line 2\n"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
    assert!(!std::fs::symlink_metadata(dir.join("router.log.1"))
        .unwrap()
        .file_type()
        .is_symlink());
    // The writer goes on at the new end, without a hole.
    log.write_all(b"new line\n").unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "new line\n");

    // A second rotation replaces the copy.
    log.write_all(b"more than ten bytes\n").unwrap();
    rotate(&fd_link(&log), 10).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("router.log.1")).unwrap(),
        "new line\nmore than ten bytes\n"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_log_that_is_not_a_regular_file_or_was_deleted_is_handled() {
    let (reader, writer) = std::io::pipe().unwrap();
    assert_eq!(
        rotate(
            &Path::new("/proc/self/fd").join(writer.as_raw_fd().to_string()),
            0
        )
        .unwrap(),
        None
    );
    drop(reader);
    let dir = temp_dir("deleted");
    let path = dir.join("router.log");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    log.write_all(b"0123456789").unwrap();
    std::fs::remove_file(&path).unwrap();
    // No copy beside a deleted file, but it is bounded all the same.
    assert_eq!(rotate(&fd_link(&log), 5).unwrap(), None);
    assert_eq!(log.metadata().unwrap().len(), 0);
    assert!(std::fs::read_dir(&dir).unwrap().next().is_none());
    let _ = std::fs::remove_dir_all(&dir);
}
