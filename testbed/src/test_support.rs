//! What the tests that build simulated clusters share, in freeflow-control's tests and in
//! freeflow-e2e: the overlay network their containers are numbered in, preflight checks that
//! fail (never skip) when the machine cannot run them, a program's output for failure messages,
//! and bounded waits.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::namespace::ensure_root;

/// The overlay network every test cluster uses.
pub const VNET: &str = "10.32.0.0/12";

/// Fails (never skips) unless the test runs as root; `mode` names the tests ("TCP-mode").
pub fn require_root(mode: &str) {
    assert!(
        ensure_root().is_ok(),
        "{mode} tests build network namespaces: run as root"
    );
}

/// Fails unless each of `programs` is on PATH; `packages` says what to install.
pub fn require_programs(programs: &[&str], packages: &str) {
    for program in programs {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            found,
            "{program} missing: apt-get install {packages} (scripts/test.sh does)"
        );
    }
}

/// A program's exit status and output, for failure messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Calls `f` every `every` until it returns Some, for at most `limit` (then None).
pub fn poll<T>(limit: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}
