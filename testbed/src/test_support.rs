//! What the tests that build simulated clusters share, in freeflow-control's tests and in
//! freeflow-e2e: the overlay network their containers are numbered in, preflight checks that
//! fail (never skip) when the machine cannot run them, a program's output for failure messages,
//! programs run within a limit, and bounded waits.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
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

/// Runs `cmd` with `input` on its stdin, waiting at most `limit`: past it the program is killed
/// (SIGKILL) and the test fails. Its output, whatever its exit status.
#[track_caller]
pub fn run_within(cmd: &mut Command, input: &[u8], limit: Duration) -> Output {
    let described = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {described}: {e}"));
    let pid = child.id() as i32;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_vec();
    // Written on a thread of its own, so that a child that does not read cannot block us.
    std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap_or_else(|e| panic!("{described}: {e}")),
        Err(_) => {
            let _ = freeflow_os::signals::send_signal(pid, libc::SIGKILL);
            panic!("{described} did not finish within {limit:?}");
        }
    }
}

/// Runs `cmd` (nothing on its stdin) within `limit`, which must succeed; its stdout.
#[track_caller]
pub fn succeed_within(cmd: &mut Command, limit: Duration) -> String {
    let out = run_within(cmd, b"", limit);
    assert!(out.status.success(), "{cmd:?}: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
