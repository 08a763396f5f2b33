//! What the router's black-box tests share: a scratch directory, the router's `--cores`, the
//! root check and a bounded wait.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Panics with `why` unless this process runs as root (network namespaces, other processes'
/// namespaces in registrations).
pub fn require_root(why: &str) {
    assert_eq!(freeflow_os::process::effective_uid(), 0, "{why}");
}

/// An empty directory `name` under the temporary directory (what a previous run left there is
/// removed).
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The state directory the tests give their routers (`--state-dir`): inside the scratch
/// directory `dir`, so that nothing is left elsewhere.
pub fn state_dir(dir: &Path) -> PathBuf {
    dir.join("state")
}

/// The control socket of a router started with `--state-dir` [`state_dir`].
pub fn control_socket(dir: &Path) -> PathBuf {
    state_dir(dir).join(freeflow_proto::CONTROL_SOCKET)
}

/// The router's `--cores`: one fewer than the machine has, leaving one to the test.
pub fn router_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() - 1)
        .unwrap_or(0)
}

/// Checks `done` every `every` until it holds; panics with `why()` once `timeout` has passed.
pub fn wait_until(
    timeout: Duration,
    every: Duration,
    mut done: impl FnMut() -> bool,
    why: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{}", why());
        std::thread::sleep(every);
    }
}
