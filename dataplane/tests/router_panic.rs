//! A panic in any thread of the router ends the process, with a log line naming the thread and
//! the panic and the distinctive exit status 70 (EX_SOFTWARE), so that its supervisor restarts
//! it, rather than leaving a process up whose shard is dead and whose containers hang.
//!
//! The panics are made with `ControlRequest::TestPanic`, which only debug builds of the router
//! obey; these tests are built in the same profile as the router, so they exist only there.
#![cfg(debug_assertions)]

use freeflow_proto::control::{self, ControlRequest, ControlResponse};
use std::process::ExitStatus;
use std::time::Duration;

// This crate uses part of the shared helpers only.
#[allow(dead_code)]
mod common;

use common::{start_router, wait_until, Router};

/// The router's exit status after a panic (sysexits' EX_SOFTWARE, internal software error).
const PANIC_EXIT_STATUS: i32 = 70;

impl Router {
    fn start(tag: &str) -> Router {
        start_router(&format!("ff-panic-{tag}-{}", std::process::id()))
    }

    fn call(&self, request: &ControlRequest) -> std::io::Result<ControlResponse> {
        control::call(
            &common::control_socket(&self.dir),
            request,
            Duration::from_secs(5),
        )
    }

    /// Waits (20 s at most) for the process to end; fails if it is still running then.
    fn exit_status(&mut self, after: &str) -> ExitStatus {
        let mut status = None;
        let log = self.dir.join("router.log");
        let child = &mut self.child;
        wait_until(
            Duration::from_secs(20),
            Duration::from_millis(20),
            || {
                status = child.try_wait().unwrap();
                status.is_some()
            },
            || {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                format!("the router still runs 20 s after {after}: {log}")
            },
        );
        status.unwrap()
    }
}

/// Checks that the router ended with [`PANIC_EXIT_STATUS`] and logged the panic of `thread`
/// with `message`.
fn assert_panic_exit(router: &mut Router, thread: &str, message: &str) {
    let status = router.exit_status(&format!("a panic of {thread}"));
    let log = router.log();
    assert_eq!(
        status.code(),
        Some(PANIC_EXIT_STATUS),
        "{status}; log: {log}"
    );
    let line = log
        .lines()
        .find(|l| l.contains(" ERROR ") && l.contains(&format!("thread {thread} panicked")))
        .unwrap_or_else(|| panic!("no panic line for {thread} in the log: {log}"));
    assert!(line.contains(message), "{line}");
    assert!(line.contains("exiting with status 70"), "{line}");
}

/// A shard that panics takes the process down (before: the shard thread died alone, the
/// router kept answering status, and its attachments hung).
#[test]
fn a_panicking_shard_ends_the_router_with_status_70() {
    let mut router = Router::start("shard");
    let answer = router
        .call(&ControlRequest::TestPanic { shard: Some(0) })
        .unwrap();
    assert_eq!(answer, ControlResponse::Ok);
    assert_panic_exit(&mut router, "ff-shard-0", "test panic of shard 0");
}

/// A panic of the control thread (the main thread) ends the process the same way.
#[test]
fn a_panicking_control_thread_ends_the_router_with_status_70() {
    let mut router = Router::start("control");
    // The control thread panics before it answers: the connection just closes.
    let answer = router.call(&ControlRequest::TestPanic { shard: None });
    assert!(answer.is_err(), "{answer:?}");
    assert_panic_exit(&mut router, "main", "test panic of the control thread");
}

/// A request for a shard that does not exist is an error, and the router stays up.
#[test]
fn a_test_panic_of_a_missing_shard_is_refused() {
    let router = Router::start("missing");
    let answer = router
        .call(&ControlRequest::TestPanic { shard: Some(99) })
        .unwrap();
    assert!(
        matches!(&answer, ControlResponse::Error { message } if message == "no such shard"),
        "{answer:?}"
    );
    assert!(router.call(&ControlRequest::Status).is_ok());
}
