//! A panic inside the router under `freeflow up`: the router exits (status 70, its last log line
//! naming the panic), the daemon restarts it and says why in `freeflow status`, and containers
//! attach to the new router and run Debian's unmodified `ibv_rc_pingpong` again.
//!
//! The panic is made with the router's `test_panic` control request, which only debug builds of
//! the router obey: this test exists only in debug builds (the workspace's binaries are built
//! in the same profile as the tests).
//!
//! Needs root, a built workspace (`cargo build --workspace`) and ibverbs-utils.
#![cfg(debug_assertions)]

mod common;

use common::{assert_pingpong_sides, poll, Site, SiteSpec, SERVER_AND_CLIENT};
use std::time::Duration;

/// Sends one request line to the router's control socket `ctl` and returns the answer line
/// (empty if the router closed the connection without one).
/// One request on a router's control socket, sent from the host's network namespace: the router
/// answers only root in its own namespace. Returns the answer line.
fn control_call(site: &Site, host: usize, request: &str) -> String {
    const SEND_ONE_LINE: &str = "import socket, sys\n\
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
s.settimeout(5)\n\
s.connect(sys.argv[1])\n\
s.sendall(sys.argv[2].encode() + b'\\n')\n\
print(s.makefile().readline(), end='')\n";
    let out = site
        .in_host(host, "python3")
        .arg("-c")
        .arg(SEND_ONE_LINE)
        .arg(site.control_socket(host))
        .arg(request)
        .output()
        .expect("run python3 in the host's namespace");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_panicking_shard_is_restarted_by_the_daemon_and_containers_attach_again() {
    let site = Site::create_verbs(SiteSpec {
        prefix: "rp",
        work_prefix: "ff-router-panic",
        hosts: 1,
        containers: SERVER_AND_CLIENT,
        registered: &[("server", "blue"), ("client", "blue")],
        verbs_timeout: 60,
        ..SiteSpec::default()
    });
    let runs = site.pingpong("ibv_rc_pingpong", 18531, &["-g", "0", "-n", "100"]);
    assert_pingpong_sides(&site, "ibv_rc_pingpong", &runs, 100, 4096);
    let before = site.router_status(0);
    let daemon = |status: &serde_json::Value, key: &str| status["daemon"][key].clone();
    let restarts_before = daemon(&before, "restarts").as_u64().unwrap_or(0);
    let pid_before = before["router"]["pid"].as_u64();

    let answer = control_call(&site, 0, r#"{"op":"test_panic","shard":0}"#);
    assert_eq!(answer.trim(), r#"{"result":"ok"}"#);

    // Before the fix the shard died alone: the router kept running and was never restarted.
    let mut status = serde_json::Value::Null;
    let restarted = poll(Duration::from_secs(20), Duration::from_millis(50), || {
        status = site.router_status(0);
        let restarts = daemon(&status, "restarts").as_u64().unwrap_or(0);
        (restarts > restarts_before && status["router"]["running"].as_bool() == Some(true))
            .then_some(())
    });
    assert!(
        restarted.is_some(),
        "router not restarted within 20 s after the panic: {status}\n{}",
        site.router_log()
    );
    assert_ne!(status["router"]["pid"].as_u64(), pid_before, "{status}");
    let last_exit = daemon(&status, "last_exit");
    assert!(
        last_exit
            .as_str()
            .is_some_and(|x| x.ends_with("exited with status 70")),
        "freeflow status: {status}"
    );
    let log = site.router_log();
    assert!(
        log.lines().any(|l| l.contains("its last log line")
            && l.contains("thread ff-shard-0 panicked")
            && l.contains("test panic of shard 0")),
        "the daemon's log names the panic: {log}"
    );
    eprintln!("freeflow status after the restart: last exit: {last_exit}");

    let runs = site.pingpong("ibv_rc_pingpong", 18532, &["-g", "0", "-n", "100"]);
    assert_pingpong_sides(&site, "ibv_rc_pingpong", &runs, 100, 4096);
}
