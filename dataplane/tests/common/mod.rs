//! What the router's black-box tests share: a scratch directory, the router's `--cores`, the
//! root check, a bounded wait and starting a router process.

use freeflow_proto::control::{self, ControlRequest, ControlResponse};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
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

/// A router process of a test, with its scratch directory (its stderr is `router.log` there);
/// killed, reaped and its directory removed on drop, also when a test fails with it running.
/// Each test file adds the methods it needs.
pub struct Router {
    pub dir: PathBuf,
    pub child: Child,
}

impl Router {
    /// What the router has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("router.log")).unwrap_or_default()
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts freeflow-router in the fresh scratch directory `name` (its `--dir`, and its
/// `--state-dir` inside it), with [`router_cores`] cores; waits (10 s at most) until it answers
/// a status request.
// verbs.rs starts its router its own way (test hooks, a registration as the readiness check).
#[allow(dead_code)]
pub fn start_router(name: &str) -> Router {
    let dir = fresh_dir(name);
    let child = Command::new(env!("CARGO_BIN_EXE_freeflow-router"))
        .arg("--dir")
        .arg(&dir)
        .arg("--state-dir")
        .arg(state_dir(&dir))
        .args(["--cores", &router_cores().to_string()])
        .stderr(std::fs::File::create(dir.join("router.log")).unwrap())
        .spawn()
        .unwrap();
    let router = Router { dir, child };
    let answers = || {
        let reply = control::call(
            &control_socket(&router.dir),
            &ControlRequest::Status,
            Duration::from_secs(5),
        );
        matches!(reply, Ok(ControlResponse::Status(_)))
    };
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(10),
        answers,
        || format!("router did not start: {}", router.log()),
    );
    router
}
