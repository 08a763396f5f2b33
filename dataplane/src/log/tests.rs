use super::{format_line, warn_line};
use freeflow_os::logfile::Summary;
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

#[test]
fn a_summary_is_a_warn_line_of_the_router() {
    let summary = Summary {
        site: "refused net:[1] Busy".to_string(),
        suppressed: 2,
        window: super::WINDOW,
    };
    let line = warn_line(SystemTime::UNIX_EPOCH, 7, &summary);
    assert!(
        line.ends_with("WARN suppressed 2 similar line(s) of refused net:[1] Busy in 10 s\n"),
        "{line}"
    );
}
